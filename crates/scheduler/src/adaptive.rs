//! Adaptive score weights: a dimension under cluster-wide pressure weighs more.
//!
//! ## Control law (deterministic, one step per [`AdaptiveWeights::update`])
//! For each dimension `d` in (cpu, memory, network), with pressure `p_d` (mean load, 0..1):
//! 1. **Hysteresis.** `boosted_d` turns on when `p_d >= high` and off when `p_d <= low`; between
//!    the two thresholds it keeps its previous state, so weights do not flap around one value.
//! 2. **Target.** `target_d = base_d × boost` when boosted, else `base_d` (`base` = the policy's
//!    weights, normalised to sum 1).
//! 3. **Smoothing.** `raw_d ← raw_d + smoothing × (target_d − raw_d)`: an exponential approach,
//!    so a step change in pressure moves weights over a few updates, never overshooting.
//! 4. **Normalisation.** The returned weights are `raw / Σ raw` (they sum to 1).
//!
//! **Bounds.** `raw_d` stays between `base_d` and `base_d × boost`, so each normalised weight is
//! bounded by its values at "nothing boosted" and "only this boosted". With the defaults
//! (base 0.4/0.4/0.2, boost 16) a network surge moves the network weight 0.2 → 0.8
//! (`3.2 / (0.4 + 0.4 + 3.2)`), and it falls back once network pressure drops below `low`.
//! A dimension with base weight 0 stays at 0.

use serde::{Deserialize, Serialize};

use crate::{PolicyError, Weights};

/// Cluster-wide pressure per dimension: mean load (0..1) over schedulable nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// CPU pressure.
    pub cpu: f64,
    /// Memory pressure.
    pub memory: f64,
    /// Network pressure.
    pub network: f64,
}

/// Parameters of the adaptive-weight control law (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaptiveConfig {
    /// Pressure at or above which a dimension is boosted. Default 0.75.
    pub high: f64,
    /// Pressure at or below which a boost is released. Default 0.55.
    pub low: f64,
    /// Multiplier of a boosted dimension's base weight. Default 16.
    pub boost: f64,
    /// Fraction of the distance to the target covered per update, in (0, 1]. Default 0.5.
    pub smoothing: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            high: 0.75,
            low: 0.55,
            boost: 16.0,
            smoothing: 0.5,
        }
    }
}

impl AdaptiveConfig {
    /// Checks `0 <= low < high`, `boost >= 1` and `0 < smoothing <= 1`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(self.low.is_finite() && self.low >= 0.0) {
            return Err(PolicyError::new(
                "adaptive.low",
                "must be a finite number >= 0",
            ));
        }
        if !(self.high.is_finite() && self.high > self.low) {
            return Err(PolicyError::new(
                "adaptive.high",
                format!("must be finite and above adaptive.low ({})", self.low),
            ));
        }
        if !(self.boost.is_finite() && self.boost >= 1.0) {
            return Err(PolicyError::new(
                "adaptive.boost",
                "must be a finite number >= 1",
            ));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(PolicyError::new("adaptive.smoothing", "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// State of the adaptive-weight controller (serializable, so a replicated state machine can
/// keep it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveWeights {
    config: AdaptiveConfig,
    base: [f64; 3],
    raw: [f64; 3],
    boosted: [bool; 3],
}

impl AdaptiveWeights {
    /// A controller starting at `base` (normalised), nothing boosted.
    pub fn new(base: Weights, config: AdaptiveConfig) -> Self {
        let b = base.normalized().to_array();
        Self {
            config,
            base: b,
            raw: b,
            boosted: [false; 3],
        }
    }

    /// Applies one step of the control law for the observed pressure; returns the new weights.
    pub fn update(&mut self, p: Pressure) -> Weights {
        let c = self.config;
        let ps = [p.cpu, p.memory, p.network];
        for d in 0..3 {
            if ps[d] >= c.high {
                self.boosted[d] = true;
            } else if ps[d] <= c.low {
                self.boosted[d] = false;
            }
            let target = if self.boosted[d] {
                self.base[d] * c.boost
            } else {
                self.base[d]
            };
            self.raw[d] += c.smoothing * (target - self.raw[d]);
        }
        self.weights()
    }

    /// The current weights (normalised).
    pub fn weights(&self) -> Weights {
        Weights {
            cpu: self.raw[0],
            memory: self.raw[1],
            network: self.raw[2],
        }
        .normalized()
    }

    /// Which dimensions (cpu, memory, network) are boosted.
    pub fn boosted(&self) -> [bool; 3] {
        self.boosted
    }

    /// Whether this controller was made for `base` weights and `config` (a policy change
    /// calls for a new controller).
    pub fn made_for(&self, base: Weights, config: AdaptiveConfig) -> bool {
        self.config == config && self.base == base.normalized().to_array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(net: f64) -> Pressure {
        Pressure {
            cpu: 0.3,
            memory: 0.3,
            network: net,
        }
    }

    #[test]
    fn network_surge_raises_then_hysteresis_lowers() {
        let mut a = AdaptiveWeights::new(Weights::default(), AdaptiveConfig::default());
        let w0 = a.update(p(0.2));
        assert!((w0.network - 0.2).abs() < 1e-12);
        // Surge: the network weight climbs monotonically towards 0.8.
        let mut last = w0.network;
        for _ in 0..8 {
            let w = a.update(p(0.9));
            assert!(w.network > last, "{w:?}");
            last = w.network;
            assert!((w.cpu + w.memory + w.network - 1.0).abs() < 1e-12);
        }
        assert!((last - 0.8).abs() < 0.01, "{last}");
        // Pressure eases into the hysteresis band: the weight holds.
        let w = a.update(p(0.65));
        assert!(w.network >= last - 1e-12);
        assert_eq!(a.boosted(), [false, false, true]);
        // Below `low`: it decays back towards 0.2.
        let mut prev = w.network;
        for _ in 0..12 {
            let w = a.update(p(0.4));
            assert!(w.network < prev);
            prev = w.network;
        }
        assert!((prev - 0.2).abs() < 0.01, "{prev}");
        assert_eq!(a.boosted(), [false; 3]);
    }

    #[test]
    fn thresholds_must_be_ordered() {
        let bad = AdaptiveConfig {
            high: 0.5,
            low: 0.6,
            ..AdaptiveConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "adaptive.high");
        assert!(AdaptiveConfig::default().validate().is_ok());
    }
}
