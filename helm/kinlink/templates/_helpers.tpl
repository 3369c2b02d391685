{{- define "kinlink.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kinlink.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kinlink.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kinlink.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kinlink.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kinlink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kinlink.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "kinlink.secretName" -}}
{{- .Values.existingSecret | default (include "kinlink.fullname" .) }}
{{- end }}

{{/*
What the pods' secrets are, for checksum/secret: the given values, and what the cluster holds
now in the Secret the pods read (lookup; empty under `helm template`). Not the random values a
first install generates: they would differ between this hash and the Secret itself. So pods
restart when the values change, and on `helm upgrade` after the Secret (ours or an
existingSecret rotated by hand or by an operator) changed.
*/}}
{{- define "kinlink.secretChecksum" -}}
{{- $live := (lookup "v1" "Secret" .Release.Namespace (include "kinlink.secretName" .)).data | default dict -}}
{{- printf "%s|%s|%s|%s|%s" .Values.existingSecret .Values.secrets.tokenSecret .Values.secrets.turnSecret (get $live "token-secret" | default "") (get $live "turn-secret" | default "") | sha256sum -}}
{{- end }}

{{/* Non-empty when several replicas share presence through Redis. */}}
{{- define "kinlink.clustered" -}}
{{- if or .Values.cluster.redis.url .Values.cluster.redis.existingSecret }}true{{ end -}}
{{- end }}

{{/* TURN behind one LoadBalancer Service per pod (a StatefulSet). */}}
{{- define "kinlink.perPod" -}}
{{- if and .Values.turn.enabled .Values.turn.perPodService.enabled }}true{{ end -}}
{{- end }}

{{/* The lowest port the pod binds; below 1024 needs NET_BIND_SERVICE. */}}
{{/* HTTPS signaling and TURN over TLS on one port (turn.tls.sharesHttpPort). */}}
{{- define "kinlink.onePort" -}}
{{- if and .Values.turn.enabled .Values.turn.tls.enabled .Values.turn.tls.sharesHttpPort }}true{{ end -}}
{{- end }}

{{/* The port HTTP (signaling) is served on. */}}
{{- define "kinlink.httpPort" -}}
{{- if include "kinlink.onePort" . }}{{ .Values.turn.tls.port }}{{ else }}{{ .Values.http.port }}{{ end -}}
{{- end }}

{{- define "kinlink.lowestPort" -}}
{{- $ports := list (int .Values.http.port) (int .Values.metrics.port) -}}
{{- if .Values.turn.enabled }}{{ $ports = append $ports (int .Values.turn.port) }}{{ end -}}
{{- if and .Values.turn.enabled .Values.turn.tls.enabled }}{{ $ports = append $ports (int .Values.turn.tls.port) }}{{ end -}}
{{- $min := 65536 -}}
{{- range $ports }}{{ if lt . $min }}{{ $min = . }}{{ end }}{{ end -}}
{{- $min -}}
{{- end }}

{{/* kinlink's configuration: chart-derived listeners over the free-form `config`. */}}
{{- define "kinlink.config" -}}
{{- $v := .Values -}}
{{- $turn := dict "enabled" $v.turn.enabled "realm" $v.turn.realm "public_host" $v.turn.publicHost -}}
{{- if $v.turn.enabled -}}
{{- $_ := set $turn "udp_listen" (printf "0.0.0.0:%d" (int $v.turn.port)) -}}
{{- $_ := set $turn "tcp_listen" (printf "0.0.0.0:%d" (int $v.turn.port)) -}}
{{- $_ := set $turn "relay_ports" (printf "%d-%d" (int $v.turn.relayPorts.min) (int $v.turn.relayPorts.max)) -}}
{{- if $v.turn.publicIP }}{{ $_ := set $turn "public_ip" $v.turn.publicIP }}{{ end -}}
{{- if and (include "kinlink.clustered" .) $v.turn.hostNetwork (not $v.turn.publicHost) }}{{ $_ := set $turn "advertise_ip" true }}{{ end -}}
{{- if $v.turn.tls.enabled -}}
{{- $_ := set $turn "tls_listen" (printf "0.0.0.0:%d" (int $v.turn.tls.port)) -}}
{{- if $v.turn.tls.secretName -}}
{{- $_ := set $turn "tls_cert" "/etc/kinlink/tls/tls.crt" -}}
{{- $_ := set $turn "tls_key" "/etc/kinlink/tls/tls.key" -}}
{{- end -}}
{{- else -}}
{{- $_ := set $turn "tls_listen" "off" -}}
{{- end -}}
{{- end -}}
{{- $http := dict "listen" (printf "0.0.0.0:%d" (int $v.http.port)) -}}
{{- if include "kinlink.onePort" . -}}
{{- $http = dict "listen" (printf "0.0.0.0:%d" (int $v.turn.tls.port)) -}}
{{- if $v.turn.tls.secretName }}{{ $_ := set $http "tls_cert" "/etc/kinlink/tls/tls.crt" }}{{ $_ := set $http "tls_key" "/etc/kinlink/tls/tls.key" }}{{ end -}}
{{- end -}}
{{- $base := dict
  "data_dir" "/var/lib/kinlink"
  "http" $http
  "metrics" (dict "listen" (printf "0.0.0.0:%d" (int $v.metrics.port)) "relay_capacity_bytes_per_sec" $v.metrics.relayCapacityBytesPerSec)
  "shutdown" (dict "grace_secs" $v.shutdownGraceSecs)
  "turn" $turn -}}
{{- if include "kinlink.clustered" . -}}
{{- $cluster := dict "presence_ttl_secs" (int $v.cluster.presenceTtlSecs) -}}
{{- with $v.cluster.redis.tls -}}
{{- if .secretName }}{{ $_ := set $cluster "redis_ca_file" "/etc/kinlink/redis-tls/ca.crt" }}{{ end -}}
{{- if and .secretName .clientCertificate }}{{ $_ := set $cluster "redis_cert_file" "/etc/kinlink/redis-tls/tls.crt" }}{{ $_ := set $cluster "redis_key_file" "/etc/kinlink/redis-tls/tls.key" }}{{ end -}}
{{- end -}}
{{- $_ := set $base "cluster" $cluster -}}
{{- end -}}
{{- if $v.acme.domains -}}
{{- $acme := dict "domains" $v.acme.domains "contact" $v.acme.contact -}}
{{- if $v.acme.directory }}{{ $_ := set $acme "directory" $v.acme.directory }}{{ end -}}
{{- $_ := set $base "acme" $acme -}}
{{- end -}}
{{- $cfg := mergeOverwrite (deepCopy ($v.config | default dict)) $base -}}
{{- include "kinlink.tomlTable" (dict "table" $cfg "prefix" "") -}}
{{- end }}

{{/* The configuration of one pod behind turn.perPodService (args `root`, `ip`): its own
load balancer's address in relayed addresses and in its STUN/TURN URLs. */}}
{{- define "kinlink.podConfig" -}}
{{- $vals := .root.Values | toYaml | fromYaml -}}
{{- $_ := set $vals.turn "publicIP" .ip -}}
{{- $_ := set $vals "config" (mergeOverwrite ($vals.config | default dict) (dict "turn" (dict "advertise_ip" true))) -}}
{{- include "kinlink.config" (dict "Values" $vals "Release" .root.Release "Chart" .root.Chart "Capabilities" .root.Capabilities "Template" .root.Template) -}}
{{- end }}

{{/* A map as TOML: plain keys first, then one [table] per nested map. */}}
{{- define "kinlink.tomlTable" -}}
{{- $prefix := .prefix -}}
{{- range $k, $val := .table }}
{{- if not (kindIs "map" $val) }}
{{ $k }} = {{ include "kinlink.tomlValue" $val }}
{{- end }}
{{- end }}
{{- range $k, $val := .table }}
{{- if kindIs "map" $val }}
{{- $name := ternary (printf "%s.%s" $prefix $k) $k (ne $prefix "") }}

[{{ $name }}]
{{- include "kinlink.tomlTable" (dict "table" $val "prefix" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* YAML numbers arrive as floats: whole ones are written as TOML integers. */}}
{{- define "kinlink.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if kindIs "string" . -}}
{{- toJson . -}}
{{- else if or (kindIs "bool" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- . -}}
{{- else if kindIs "slice" . -}}
{{- toJson . -}}
{{- else -}}
{{- fail (printf "config: unsupported value %v (%s)" . (kindOf .)) -}}
{{- end -}}
{{- end }}
