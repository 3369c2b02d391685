//! How family connections end up: direct, through the TURN relay, or back on HTTP sync.
//!
//! A negotiation is tracked per unordered device pair of a family. Relaying an `offer` opens
//! it; the first `p2p-status` report from either side closes it with an [`Outcome`]; no
//! report within `signal.negotiation_timeout_secs` closes it as [`Outcome::Abandoned`].
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

/// The `state` of a `p2p-status` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
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
    /// Open until an outcome; then kept until `expires` to absorb the other side's report.
    closed: bool,
    /// When an open entry is abandoned, or a closed one forgotten.
    expires: Instant,
}

/// Every negotiation of this node.
#[derive(Debug)]
pub struct Negotiations {
    window: Duration,
    pairs: HashMap<PairKey, Entry>,
    /// Entries not closed, kept in step with `pairs` so the gauge is not a scan per offer.
    open: usize,
}

fn key(family: &str, a: &str, b: &str) -> PairKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    (family.into(), lo.into(), hi.into())
}

impl Negotiations {
    /// Empty; negotiations without a report are abandoned after `window`.
    pub fn new(window: Duration) -> Self {
        Negotiations { window, pairs: HashMap::new(), open: 0 }
    }

    /// Open negotiations (for the gauge).
    pub fn open(&self) -> usize {
        debug_assert_eq!(self.open, self.pairs.values().filter(|e| !e.closed).count(), "open count out of step");
        self.open
    }

    /// An offer from `from` to `to` was relayed. Returns true when this opened a negotiation
    /// (a repeated offer while one is open, e.g. an ICE restart, does not restart it).
    pub fn offer(&mut self, family: &str, from: &str, to: &str, now: Instant) -> bool {
        let expires = now + self.window;
        match self.pairs.entry(key(family, from, to)) {
            hash_map::Entry::Occupied(mut o) if !o.get().closed => {
                o.get_mut().expires = expires;
                false
            }
            hash_map::Entry::Occupied(mut o) => {
                *o.get_mut() = Entry { opened: now, closed: false, expires };
                self.open += 1;
                true
            }
            hash_map::Entry::Vacant(v) => {
                v.insert(Entry { opened: now, closed: false, expires });
                self.open += 1;
                true
            }
        }
    }

    /// `reporter` says its connection to `peer` is in `state` over `route`.
    pub fn report(
        &mut self,
        family: &str,
        reporter: &str,
        peer: &str,
        state: State,
        route: Option<Route>,
        now: Instant,
    ) -> Result<Reported, ReportError> {
        let outcome = match (state, route) {
            (_, Some(Route::Http)) | (State::Failed, _) => Outcome::HttpFallback,
            (State::Connected, Some(Route::Relay)) => Outcome::Relay,
            (State::Connected, Some(_)) => Outcome::Direct,
            (State::Connected, None) => return Err(ReportError::MissingRoute),
            (State::Closed, _) => Outcome::Abandoned,
        };
        let entry = self.pairs.get_mut(&key(family, reporter, peer)).ok_or(ReportError::Unknown)?;
        if entry.closed {
            return Ok(Reported::Known);
        }
        entry.closed = true;
        entry.expires = now + self.window;
        self.open -= 1;
        let connect = (state == State::Connected).then(|| now.saturating_duration_since(entry.opened));
        Ok(Reported::Closed { outcome, connect })
    }

    /// Closes negotiations whose window passed (returning how many were abandoned) and
    /// forgets closed ones past theirs.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut abandoned = 0;
        self.pairs.retain(|_, e| {
            if e.expires > now {
                return true;
            }
            if e.closed {
                return false;
            }
            abandoned += 1;
            e.closed = true;
            e.expires = now + self.window;
            true
        });
        self.open -= abandoned;
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    #[test]
    fn first_connected_report_closes_once_for_both_sides() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W);
        assert!(n.offer("f", "a", "b", t0));
        assert!(!n.offer("f", "a", "b", t0 + Duration::from_secs(1)), "a repeated offer keeps the negotiation");
        assert_eq!(n.open(), 1);
        let r = n.report("f", "b", "a", State::Connected, Some(Route::Srflx), t0 + Duration::from_millis(1500));
        assert_eq!(r, Ok(Reported::Closed { outcome: Outcome::Direct, connect: Some(Duration::from_millis(1500)) }));
        let r = n.report("f", "a", "b", State::Connected, Some(Route::Srflx), t0 + Duration::from_secs(2));
        assert_eq!(r, Ok(Reported::Known), "the other side's report is not counted again");
        assert_eq!(n.open(), 0);
    }

    #[test]
    fn routes_and_states_map_to_outcomes() {
        let t0 = Instant::now();
        let cases = [
            (State::Connected, Some(Route::Host), Outcome::Direct),
            (State::Connected, Some(Route::Prflx), Outcome::Direct),
            (State::Connected, Some(Route::Relay), Outcome::Relay),
            (State::Connected, Some(Route::Http), Outcome::HttpFallback),
            (State::Failed, None, Outcome::HttpFallback),
            (State::Failed, Some(Route::Relay), Outcome::HttpFallback),
            (State::Closed, Some(Route::Http), Outcome::HttpFallback),
            (State::Closed, None, Outcome::Abandoned),
        ];
        for (state, route, want) in cases {
            let mut n = Negotiations::new(W);
            n.offer("f", "a", "b", t0);
            match n.report("f", "a", "b", state, route, t0).unwrap() {
                Reported::Closed { outcome, connect } => {
                    assert_eq!(outcome, want, "{state:?} {route:?}");
                    assert_eq!(connect.is_some(), state == State::Connected);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn reports_without_a_negotiation_are_refused() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W);
        n.offer("f", "a", "b", t0);
        assert_eq!(n.report("f", "a", "c", State::Connected, Some(Route::Host), t0), Err(ReportError::Unknown));
        assert_eq!(n.report("g", "a", "b", State::Connected, Some(Route::Host), t0), Err(ReportError::Unknown), "other family");
        assert_eq!(n.report("f", "a", "b", State::Connected, None, t0), Err(ReportError::MissingRoute));
        assert_eq!(n.open(), 1, "refused reports change nothing");
    }

    #[test]
    fn silence_is_abandoned_after_the_window_and_then_forgotten() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W);
        n.offer("f", "a", "b", t0);
        n.offer("f", "c", "a", t0 + Duration::from_secs(30));
        assert_eq!(n.expire(t0 + Duration::from_secs(59)), 0);
        assert_eq!(n.expire(t0 + W), 1);
        assert_eq!(n.open(), 1);
        // A late report about the abandoned one is accepted but not counted again.
        assert_eq!(n.report("f", "b", "a", State::Connected, Some(Route::Host), t0 + W), Ok(Reported::Known));
        assert_eq!(n.expire(t0 + Duration::from_secs(90)), 1);
        assert_eq!(n.expire(t0 + Duration::from_secs(200)), 0);
        assert!(n.pairs.is_empty(), "closed entries are forgotten after the window");
        assert_eq!(n.open(), 0);
        // A new offer after the end opens a new negotiation.
        assert!(n.offer("f", "a", "b", t0 + Duration::from_secs(300)));
    }

    #[test]
    fn offer_after_close_opens_again() {
        let t0 = Instant::now();
        let mut n = Negotiations::new(W);
        n.offer("f", "a", "b", t0);
        n.report("f", "a", "b", State::Failed, None, t0).unwrap();
        assert!(n.offer("f", "b", "a", t0 + Duration::from_secs(5)), "a renegotiation after an outcome is new");
        let r = n.report("f", "a", "b", State::Connected, Some(Route::Relay), t0 + Duration::from_secs(7)).unwrap();
        assert_eq!(r, Reported::Closed { outcome: Outcome::Relay, connect: Some(Duration::from_secs(2)) });
    }
}
