//! Why a control plane's resources are refused: which resource, which field, what is wrong.
//!
//! The message goes back to the control plane with the NACK.

use std::fmt;

use super::kind::Kind;
use crate::config;

/// Why a response, or the resources in force with it, cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A resource of a response does not decode, or is of another type than the response's.
    #[error("resources[{index}]: {problem}")]
    Undecodable { index: usize, problem: Problem },
    /// Two resources of a response have the same name.
    #[error("{kind} {name:?} is sent twice")]
    SentTwice { kind: Kind, name: String },
    /// A resource asks for what the proxy cannot honour.
    #[error("{kind} {name:?}: {invalid}")]
    Resource {
        kind: Kind,
        name: String,
        invalid: Invalid,
    },
    /// The file's configuration with the resources added does not check out.
    #[error(transparent)]
    Merged(#[from] config::Invalid),
}

/// A problem at a place in a resource, written `field: field: problem`, outermost first
/// (`filter_chains[0].filters[1] (name): http_filters[2] (name): not supported ...`).
#[derive(Debug)]
pub struct Invalid {
    /// The fields from the problem outwards: each caller on the way up adds its own.
    fields: Vec<String>,
    problem: Problem,
}

impl Invalid {
    /// The same problem, inside `field`.
    pub fn at(mut self, field: impl Into<String>) -> Invalid {
        self.fields.push(field.into());
        self
    }

    /// The resource named `name` of `kind` has this problem.
    pub fn of(self, kind: Kind, name: impl Into<String>) -> Error {
        Error::Resource {
            kind,
            name: name.into(),
            invalid: self,
        }
    }
}

impl From<Problem> for Invalid {
    fn from(problem: Problem) -> Invalid {
        Invalid {
            fields: Vec::new(),
            problem,
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for field in self.fields.iter().rev() {
            write!(f, "{field}: ")?;
        }
        self.problem.fmt(f)
    }
}

impl std::error::Error for Invalid {}

/// Places the error of a result inside a field.
pub trait At<T> {
    fn at(self, field: impl Into<String>) -> Result<T, Invalid>;
}

impl<T, E: Into<Invalid>> At<T> for Result<T, E> {
    fn at(self, field: impl Into<String>) -> Result<T, Invalid> {
        self.map_err(|e| e.into().at(field))
    }
}

/// What is wrong with a field.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A setting the proxy cannot honour (it names itself).
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// Something required is not there.
    #[error("needs {0}")]
    Missing(&'static str),
    /// A field lacks all of the choices it takes.
    #[error("{field} needs {choices}")]
    NoChoice {
        field: &'static str,
        choices: &'static str,
    },
    /// Of a kind of setting, only these are supported.
    #[error("{0} are supported")]
    SupportedAre(&'static str),
    /// Of a kind of setting, only this one is supported.
    #[error("only {0} is supported")]
    OnlyOne(&'static str),
    /// An enum value this version of the API types does not know.
    #[error("{field} {value} is unknown")]
    Unknown { field: &'static str, value: i32 },
    /// A resource of another type than expected.
    #[error("a {found} in a response of {expected}")]
    WrongType { found: String, expected: String },
    /// A message that does not decode.
    #[error("not a valid {message}: {error}")]
    Undecodable {
        message: String,
        error: prost::DecodeError,
    },
    #[error("{0:?} is not an IP address (sockmesh-proxy does not resolve names)")]
    NotAnIp(String),
    #[error("custom cluster type {0:?} is not supported")]
    CustomClusterType(String),
    #[error("{0} is not supported (http_connection_manager and tcp_proxy are)")]
    NetworkFilter(String),
    #[error("not supported (router and fault are); mark it is_optional to go without it")]
    HttpFilter,
    #[error("a tcp_proxy to a cluster needs a destination_port or server_names match (unmatched TCP goes to its original destination)")]
    UnmatchedTcpProxy,
    #[error("invert_match is supported with present_match only")]
    InvertMatch,
    #[error("only exact string matches are supported")]
    QueryMatch,
    #[error("only route actions are supported (not redirect, direct_response, ...)")]
    NotRouteAction,
    #[error("cluster {0:?} is ORIGINAL_DST: routes to it are not supported (unrouted requests go to their original destination)")]
    RouteToOriginalDst(String),
    #[error("lb_policy {0} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV are)")]
    LbPolicy(String),
    #[error("load_balancing_policy is not supported: use lb_policy")]
    LoadBalancingPolicy,
    #[error("load_balancing_weight must be 1 or more")]
    ZeroWeight,
}
