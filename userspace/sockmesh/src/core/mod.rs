//! What every role of the binary shares: the pod model ([`spec`], [`net`], [`settings`] for the
//! wire), the maps ([`maps`], [`registry`], [`live`] for a pod's live state), the loader
//! ([`loader`], [`btf`]) and the system calls beyond aya ([`sys`]).

pub mod btf;
pub mod live;
pub mod loader;
pub mod maps;
pub mod net;
pub mod registry;
pub mod settings;
pub mod spec;
pub mod sys;
pub mod userns;
