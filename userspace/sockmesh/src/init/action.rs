//! What `init` does besides describing the capture: a dry run, a clean-up, the validation
//! probe, which agent to call, and the pod's own acceleration level.

use std::{path::PathBuf, time::Duration};

use sockmesh_common::PodFlags;

/// Non-capture settings `init` acts on.
#[derive(Debug, Clone)]
pub struct InitAction {
    pub dry_run: bool,
    pub cleanup_only: bool,
    /// `--skip-rule-apply`: register nothing.
    pub skip_apply: bool,
    /// `--run-validation`: probe port and timeout.
    pub validation: Option<(u16, Duration)>,
    pub agent_socket: PathBuf,
    /// Accepted settings that need no action under sockmesh, with why (printed by init).
    pub notes: Vec<String>,
}

/// Socket acceleration of the pod being registered: `off`, `proxies` (the default: the
/// proxy's sockets only) or `all` (the app's too; `on`, as earlier releases said it).
pub const ACCELERATION_ENV: &str = "SOCKMESH_ACCELERATION";

/// A `SOCKMESH_ACCELERATION` value that is none of the levels.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{ACCELERATION_ENV}={0:?}: want off, proxies (the default: the proxy's local connections \
     skip TCP/IP) or all (the app's writes to its proxy too; its blocking reads may then \
     return EAGAIN early, see docs/operations.md)"
)]
pub struct BadAcceleration(pub String);

/// The pod flags for a `SOCKMESH_ACCELERATION` value (unset or empty: the default).
pub fn acceleration_flags(value: Option<&str>) -> Result<PodFlags, BadAcceleration> {
    match value {
        None | Some("" | "proxies") => Ok(PodFlags::NONE),
        Some("off") => Ok(PodFlags::NO_ACCEL),
        // `on` is how earlier releases said it, when every local socket was accelerated.
        Some("all" | "on") => Ok(PodFlags::ACCEL_APPS),
        Some(other) => Err(BadAcceleration(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceleration_levels_and_a_bad_one() {
        assert_eq!(acceleration_flags(None), Ok(PodFlags::NONE));
        assert_eq!(acceleration_flags(Some("")), Ok(PodFlags::NONE));
        assert_eq!(acceleration_flags(Some("proxies")), Ok(PodFlags::NONE));
        assert_eq!(acceleration_flags(Some("off")), Ok(PodFlags::NO_ACCEL));
        assert_eq!(acceleration_flags(Some("all")), Ok(PodFlags::ACCEL_APPS));
        assert_eq!(
            acceleration_flags(Some("on")),
            Ok(PodFlags::ACCEL_APPS),
            "the old spelling"
        );
        let e = acceleration_flags(Some("fast")).unwrap_err().to_string();
        assert!(
            e.contains("want off, proxies") && e.contains("SOCKMESH_ACCELERATION=\"fast\""),
            "{e}"
        );
    }
}
