//! Policy: the rule model, its compilation into datapath entries, and the reference evaluator
//! that decides exactly as the kernel does.

pub mod compile;
pub mod eval;
pub mod fqdn;
pub mod grant;
pub mod lint;
pub mod model;
pub mod names;
pub mod owner;
pub mod scenario;
pub mod schedule;
pub mod source;

pub use compile::{CompileError, CompiledTrie, compile_rules};
pub use eval::{Decision, Subject, Verdict, evaluate_flow, evaluate_socket};
pub use fqdn::{FqdnError, FqdnKind, FqdnPattern};
pub use model::{
    DEFAULT_GLOBAL_DENY, Direction, IdentityStatus, IdentityView, Mode, Net, PortRange, Protocol,
    Reason, Rule, SniCheck, UnknownFlows,
};
