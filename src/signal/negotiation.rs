//! How family connections end up: direct, through the TURN relay, or back on HTTP sync.
//!
//! A negotiation is tracked per unordered device pair of a family. Relaying an `offer` opens
//! it; `p2p-status` reports close it with an [`Outcome`]; no report within
//! `signal.negotiation_timeout_secs` closes it as [`Outcome::Abandoned`].
//!
//! The route is the pair's, not one side's: when only one side's local candidate is a relay,
//! the other side sees its own srflx candidate and would report "direct". So a connection is
//! `relay` when either end of the selected pair is a relay candidate: a report that carries
//! the remote candidate type (`remoteRoute`) decides at once; a "direct" report without it
//! waits up to `signal.negotiation_settle_secs` for the other side's report, which turns it
//! into `relay` if that side's local candidate is one, and counts as direct otherwise.
//! A closed negotiation is remembered for the same window, so the other side's report of the
//! same connection is accepted without being counted twice. No IO and no clock of its own:
//! callers pass `now`, tests pass made-up instants.

use std::collections::{hash_map, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a negotiation ended; the `outcome` label of `kinlink_p2p_negotiations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected over a host, server-reflexive or peer-reflexive candidate.
    Direct,
    /// Connected through a TURN relay.
    Relay,
    /// P2P failed, or the app gave up and synced over HTTP.
    HttpFallback,
    /// No report within the window, or the connection was closed before it connected.
    Abandoned,
}

impl Outcome {
    /// Every outcome, for pre-registering metrics.
    pub const ALL: [Outcome; 4] = [Outcome::Direct, Outcome::Relay, Outcome::HttpFallback, Outcome::Abandoned];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Direct => "direct",
            Outcome::Relay => "relay",
            Outcome::HttpFallback => "http_fallback",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// A `p2p-status` report, as forwarded to the node that relayed the offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The reported state.
    pub state: State,
    /// The reporter's route.
    pub route: Option<Route>,
    /// The route the reporter saw its peer use.
    pub remote: Option<Route>,
}

/// The `state` of a `p2p-status` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The peer connection reached `connected`.
    Connected,
    /// It reached `failed`.
    Failed,
    /// It was closed.
    Closed,
}

/// The `route` of a `p2p-status` report: the selected pair's local candidate type, or `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Host candidate.
    Host,
    /// Server-reflexive (STUN).
    Srflx,
    /// Peer-reflexive.
    Prflx,
    /// TURN relay.
    Relay,
    /// The app gave up on P2P and syncs over HTTP.
    Http,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// It closed an open negotiation: count `outcome`, observe `connect` if it connected.
    Closed {
        /// The outcome.
        outcome: Outcome,
        /// Offer relayed → first `connected`, for `kinlink_p2p_connect_seconds`.
        connect: Option<Duration>,
    },
    /// It is about a negotiation already closed (the other side reported first, or a later
    /// state change): accepted, not counted.
    Known,
    /// A direct connection reported without the remote candidate type: counted when the other
    /// side reports, or as direct after the settle time.
    Settling,
}

/// What [`Negotiations::expire`] closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Negotiations without a report in the window.
    pub abandoned: usize,
    /// Direct connections whose other side never contradicted them: their connect times.
    pub direct: Vec<Duration>,
}

/// Why a report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// No offer was relayed between the two devices within the window.
    #[error("no negotiation with this device")]
    Unknown,
    /// `connected` without a `route`.
    #[error("`connected` needs a `route`")]
    MissingRoute,
}

type PairKey = (Arc<str>, Arc<str>, Arc<str>);

#[derive(Debug)]
struct Entry {
    /// When the offer was relayed (the first one, if offers repeat while open).
    opened: Instant,
    phase: Phase,
    /// When an open entry is abandoned, a settling one counted as direct, or a closed one
    /// forgotten.
    expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No outcome yet.
    Open,
    /// Reported connected directly by one side, which did not know the remote candidate type.
    Settling { connect: Duration },
    /// Counted; kept until `expires` to absorb the other side's report.
    Closed,
}

/// Every negotiation of this node.
#[derive(Debug)]
pub struct Negotiations {
    window: Duration,
    settle: Duration,
    pairs: HashMap<PairKey, Entry>,
    /// Entries not closed, kept in step with `pairs` so the gauge is not a scan per offer.
    open: usize,
}

fn key(family: &str, a: &str, b: &str) -> PairKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    (family.into(), lo.into(), hi.into())
}

impl Negotiations {
    /// Empty; negotiations without a report are abandoned after `window`; a direct report
    /// without the remote candidate type waits `settle` for the other side's.
    pub fn new(window: Duration, settle: Duration) -> Self {
        Negotiations { window, settle, pairs: HashMap::new(), open: 0 }
    }

    /// Negotiations not counted yet (for the gauge).
    pub fn open(&self) -> usize {
        debug_assert_eq!(self.open, self.pairs.values().filter(|e| e.phase != Phase::Closed).count(), "open count out of step");
        self.open
    }

    /// An offer from `from` to `to` was relayed. Returns true when this opened a negotiation
    /// (a repeated offer while one is open, e.g. an ICE restart, does not restart it).
    pub fn offer(&mut self, family: &str, from: &str, to: &str, now: Instant) -> bool {
        let expires = now + self.window;
        match self.pairs.entry(key(family, from, to)) {
            hash_map::Entry::Occupied(mut o) if o.get().phase == Phase::Open => {
                o.get_mut().expires = expires;
                false
            }
            // A settling one is left to settle: a repeated offer (ICE restart) is the same
            // connection.
            hash_map::Entry::Occupied(o) if matches!(o.get().phase, Phase::Settling { .. }) => false,
            hash_map::Entry::Occupied(mut o) => {
                *o.get_mut() = Entry { opened: now, phase: Phase::Open, expires };
                self.open += 1;
                true
            }
            hash_map::Entry::Vacant(v) => {
                v.insert(Entry { opened: now, phase: Phase::Open, expires });
                self.open += 1;
                true
            }
        }
    }

    /// `reporter` says its connection to `peer` is in `state` over `route` (its local
    /// candidate type), with `remote` the other end's candidate type when it knows it.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &mut self,
        family: &str,
        reporter: &str,
        peer: &str,
        state: State,
        route: Option<Route>,
        remote: Option<Route>,
        now: Instant,
    ) -> Result<Reported, ReportError> {
        let relayed = route == Some(Route::Relay) || remote == Some(Route::Relay);
        let outcome = match (state, route) {
            (_, Some(Route::Http)) | (State::Failed, _) => Outcome::HttpFallback,
            (State::Connected, Some(_)) if relayed => Outcome::Relay,
            (State::Connected, Some(_)) => Outcome::Direct,
            (State::Connected, None) => return Err(ReportError::MissingRoute),
            (State::Closed, _) => Outcome::Abandoned,
        };
        let (window, settle) = (self.window, self.settle);
        let entry = self.pairs.get_mut(&key(family, reporter, peer)).ok_or(ReportError::Unknown)?;
        let (outcome, connect) = match entry.phase {
            Phase::Closed => return Ok(Reported::Known),
            // The other side's report settles it: relay if its end is a relay candidate.
            Phase::Settling { connect } => (if state == State::Connected && relayed { Outcome::Relay } else { Outcome::Direct }, Some(connect)),
            Phase::Open => {
                let connect = (state == State::Connected).then(|| now.saturating_duration_since(entry.opened));
                if let (Outcome::Direct, None, Some(connect)) = (outcome, remote, connect) {
                    entry.phase = Phase::Settling { connect };
                    entry.expires = now + settle;
                    return Ok(Reported::Settling);
                }
                (outcome, connect)
            }
        };
        entry.phase = Phase::Closed;
        entry.expires = now + window;
        self.open -= 1;
        Ok(Reported::Closed { outcome, connect })
    }

    /// Closes negotiations whose window passed (abandoned) and settling ones whose settle
    /// time passed (direct), and forgets closed ones past theirs.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        self.pairs.retain(|_, e| {
            if e.expires > now {
                return true;
            }
            match e.phase {
                Phase::Closed => return false,
                Phase::Open => out.abandoned += 1,
                Phase::Settling { connect } => out.direct.push(connect),
            }
            e.phase = Phase::Closed;
            e.expires = now + self.window;
            true
        });
        self.open -= out.abandoned + out.direct.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);
    const S: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_decisive_report_closes_once_for_both_sides() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W, S);
        assert!(n.offer("f", "a", "b", t0));
        assert!(!n.offer("f", "a", "b", t0 + ms(1000)), "a repeated offer keeps the negotiation");
        assert_eq!(n.open(), 1);
        let r = n.report("f", "b", "a", State::Connected, Some(Route::Srflx), Some(Route::Host), t0 + ms(1500));
        assert_eq!(r, Ok(Reported::Closed { outcome: Outcome::Direct, connect: Some(ms(1500)) }));
        let r = n.report("f", "a", "b", State::Connected, Some(Route::Host), Some(Route::Srflx), t0 + ms(2000));
        assert_eq!(r, Ok(Reported::Known), "the other side's report is not counted again");
        assert_eq!(n.open(), 0);
    }

    #[test]
    fn a_one_sided_relay_counts_as_relay_whichever_side_reports_first() {
        let t0 = Instant::now();
        // a's local candidate is a relay, b's is srflx: every byte crosses TURN.
        for a_first in [true, false] {
            // Clients that report the remote type: the first report decides.
            let mut n = Negotiations::new(W, S);
            n.offer("f", "a", "b", t0);
            let first = if a_first {
                n.report("f", "a", "b", State::Connected, Some(Route::Relay), Some(Route::Srflx), t0 + ms(900))
            } else {
                n.report("f", "b", "a", State::Connected, Some(Route::Srflx), Some(Route::Relay), t0 + ms(900))
            };
            assert_eq!(first, Ok(Reported::Closed { outcome: Outcome::Relay, connect: Some(ms(900)) }), "a_first={a_first}");
            // Clients that report only their local type: b's "srflx" must wait for a's.
            let mut n = Negotiations::new(W, S);
            n.offer("f", "a", "b", t0);
            let (first, second) = if a_first {
                (
                    n.report("f", "a", "b", State::Connected, Some(Route::Relay), None, t0 + ms(900)),
                    n.report("f", "b", "a", State::Connected, Some(Route::Srflx), None, t0 + ms(950)),
                )
            } else {
                (
                    n.report("f", "b", "a", State::Connected, Some(Route::Srflx), None, t0 + ms(900)),
                    n.report("f", "a", "b", State::Connected, Some(Route::Relay), None, t0 + ms(950)),
                )
            };
            if a_first {
                assert_eq!(first, Ok(Reported::Closed { outcome: Outcome::Relay, connect: Some(ms(900)) }));
                assert_eq!(second, Ok(Reported::Known));
            } else {
                assert_eq!(first, Ok(Reported::Settling), "a direct report without the remote type waits");
                assert_eq!(second, Ok(Reported::Closed { outcome: Outcome::Relay, connect: Some(ms(900)) }), "the later relay report overrides");
            }
            assert_eq!(n.open(), 0);
        }
    }

    #[test]
    fn an_uncontradicted_direct_report_counts_after_the_settle_time() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W, S);
        n.offer("f", "a", "b", t0);
        assert_eq!(n.report("f", "a", "b", State::Connected, Some(Route::Host), None, t0 + ms(700)), Ok(Reported::Settling));
        assert_eq!(n.expire(t0 + ms(700) + S - ms(1)), Expired::default());
        assert_eq!(n.expire(t0 + ms(700) + S), Expired { abandoned: 0, direct: vec![ms(700)] });
        assert_eq!(n.open(), 0);
        // The other side's late report is known, not counted.
        assert_eq!(n.report("f", "b", "a", State::Connected, Some(Route::Relay), None, t0 + S + S), Ok(Reported::Known));
        // Both sides direct: the second report settles it at once.
        let mut n = Negotiations::new(W, S);
        n.offer("f", "a", "b", t0);
        assert_eq!(n.report("f", "a", "b", State::Connected, Some(Route::Host), None, t0 + ms(700)), Ok(Reported::Settling));
        let r = n.report("f", "b", "a", State::Connected, Some(Route::Prflx), None, t0 + ms(800));
        assert_eq!(r, Ok(Reported::Closed { outcome: Outcome::Direct, connect: Some(ms(700)) }));
    }

    #[test]
    fn routes_and_states_map_to_outcomes() {
        let t0 = Instant::now();
        let cases = [
            (State::Connected, Some(Route::Host), Some(Route::Host), Outcome::Direct),
            (State::Connected, Some(Route::Prflx), Some(Route::Srflx), Outcome::Direct),
            (State::Connected, Some(Route::Relay), None, Outcome::Relay),
            (State::Connected, Some(Route::Host), Some(Route::Relay), Outcome::Relay),
            (State::Connected, Some(Route::Http), None, Outcome::HttpFallback),
            (State::Failed, None, None, Outcome::HttpFallback),
            (State::Failed, Some(Route::Relay), None, Outcome::HttpFallback),
            (State::Closed, Some(Route::Http), None, Outcome::HttpFallback),
            (State::Closed, None, None, Outcome::Abandoned),
        ];
        for (state, route, remote, want) in cases {
            let mut n = Negotiations::new(W, S);
            n.offer("f", "a", "b", t0);
            match n.report("f", "a", "b", state, route, remote, t0).unwrap() {
                Reported::Closed { outcome, connect } => {
                    assert_eq!(outcome, want, "{state:?} {route:?} {remote:?}");
                    assert_eq!(connect.is_some(), state == State::Connected);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn reports_without_a_negotiation_are_refused() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W, S);
        n.offer("f", "a", "b", t0);
        assert_eq!(n.report("f", "a", "c", State::Connected, Some(Route::Host), None, t0), Err(ReportError::Unknown));
        assert_eq!(n.report("g", "a", "b", State::Connected, Some(Route::Host), None, t0), Err(ReportError::Unknown), "other family");
        assert_eq!(n.report("f", "a", "b", State::Connected, None, None, t0), Err(ReportError::MissingRoute));
        assert_eq!(n.open(), 1, "refused reports change nothing");
    }

    #[test]
    fn silence_is_abandoned_after_the_window_and_then_forgotten() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W, S);
        n.offer("f", "a", "b", t0);
        n.offer("f", "c", "a", t0 + Duration::from_secs(30));
        assert_eq!(n.expire(t0 + Duration::from_secs(59)).abandoned, 0);
        assert_eq!(n.expire(t0 + W).abandoned, 1);
        assert_eq!(n.open(), 1);
        // A late report about the abandoned one is accepted but not counted again.
        assert_eq!(n.report("f", "b", "a", State::Connected, Some(Route::Host), None, t0 + W), Ok(Reported::Known));
        assert_eq!(n.expire(t0 + Duration::from_secs(90)).abandoned, 1);
        assert_eq!(n.expire(t0 + Duration::from_secs(200)), Expired::default());
        assert!(n.pairs.is_empty(), "closed entries are forgotten after the window");
        assert_eq!(n.open(), 0);
        // A new offer after the end opens a new negotiation.
        assert!(n.offer("f", "a", "b", t0 + Duration::from_secs(300)));
    }

    #[test]
    fn offer_after_close_opens_again() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W, S);
        n.offer("f", "a", "b", t0);
        n.report("f", "a", "b", State::Failed, None, None, t0).unwrap();
        assert!(n.offer("f", "b", "a", t0 + Duration::from_secs(5)), "a renegotiation after an outcome is new");
        let r = n.report("f", "a", "b", State::Connected, Some(Route::Relay), None, t0 + Duration::from_secs(7)).unwrap();
        assert_eq!(r, Reported::Closed { outcome: Outcome::Relay, connect: Some(Duration::from_secs(2)) });
    }
}
