//! The operator's commands: [`dump`] the maps, [`explain`] a verdict. Both read the pinned
//! maps, so they work while the agent is down.

pub mod dump;
pub mod explain;
