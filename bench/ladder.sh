# Sourced by the TURN benchmarks (bash). `ladder CMD...` runs `CMD... --rate R` for each R in
# $RATES, printing each RESULT line, and stops after the first run that lost 0.1% or more (or
# failed): the last rate under it is the point's capacity.
ladder() {
  local rate line loss
  for rate in $RATES; do
    line=$("$@" --rate "$rate")
    echo "$line"
    loss=$(sed -n 's/.* loss_pct=\([0-9.]*\).*/\1/p' <<<"$line")
    if [ -z "$loss" ] || awk "BEGIN{exit !($loss >= 0.1)}"; then break; fi
  done
}
