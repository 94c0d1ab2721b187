//! How the agent's errors become gRPC statuses: the one place that decides
//! which code an operator (and the CLI's exit code) sees.
//!
//! | code                 | meaning                                             | CLI exit |
//! |----------------------|-----------------------------------------------------|----------|
//! | `InvalidArgument`    | malformed name or value                             | 2        |
//! | `NotFound`           | unknown VM or node                                  | 2        |
//! | `AlreadyExists`      | duplicate name                                      | 2        |
//! | `FailedPrecondition` | the cluster refuses it in its current state         | 2        |
//! | `PermissionDenied`   | certificate role or join token does not allow it    | 1        |
//! | `Unavailable`        | no leader or quorum, unreachable, not a member yet, | 1        |
//! |                      | a member has not reported its capacity yet          |          |
//! | `DeadlineExceeded`   | timed out                                           | 1        |
//! | `Aborted`            | dropped or outcome unknown after a leader change    | 1        |
//! | `Internal`           | a bug                                               | 1        |
//!
//! Every message is one sentence for an operator. `Unavailable` always
//! means the request was *not* applied, which is what lets the forwarding
//! code retry it.

use tonic::{Code, Status};

use crate::node::NodeError;
use crate::state::Rejection;

/// The gRPC code for a command the state machine refused.
pub fn rejection_code(rejection: &Rejection) -> Code {
    match rejection {
        Rejection::InvalidName { .. } | Rejection::InvalidValue(_) | Rejection::Malformed(_) => Code::InvalidArgument,
        Rejection::UnknownVm(_) | Rejection::UnknownNode(_) | Rejection::UnknownNodeName(_) => Code::NotFound,
        Rejection::DuplicateVm(_) | Rejection::DuplicateMemberName { .. } | Rejection::DuplicateMember(_) => {
            Code::AlreadyExists
        }
        // Another decision changed the VM first: a concurrency conflict,
        // worth retrying, not a refusal.
        Rejection::StaleGeneration { .. } => Code::Aborted,
        Rejection::NotLearner(_)
        | Rejection::NotVoter(_)
        | Rejection::LastVoter(_)
        | Rejection::OverCapacity { .. }
        | Rejection::CapacityBelowUse { .. }
        | Rejection::MissingRunner { .. }
        | Rejection::NodeUnavailable { .. }
        | Rejection::PinnedElsewhere { .. }
        | Rejection::LabelMismatch { .. }
        | Rejection::AntiAffinity { .. }
        | Rejection::NotPlacedThere { .. }
        | Rejection::NoSuchHandoff { .. }
        | Rejection::HandoffFromLiveHost { .. }
        | Rejection::RecoverFromLiveHost { .. }
        | Rejection::TooManyJoinTokens(_) => Code::FailedPrecondition,
        Rejection::InvalidJoinToken => Code::PermissionDenied,
        Rejection::NotReported { .. } => Code::Unavailable,
    }
}

pub fn from_rejection(rejection: &Rejection) -> Status {
    Status::new(rejection_code(rejection), rejection.to_string())
}

/// The status for a node error that reached the client (forwarding and
/// retrying already happened).
pub fn from_node_error(error: &NodeError) -> Status {
    let code = match error {
        NodeError::Rejected(rejection) => return from_rejection(rejection),
        NodeError::NotLeader { .. } => {
            return Status::unavailable("the leader changed while the request was forwarded; it was not applied");
        }
        NodeError::NoLeader | NodeError::Overloaded | NodeError::NotMember | NodeError::Stopped => Code::Unavailable,
        NodeError::Dropped | NodeError::Unknown => Code::Aborted,
        NodeError::Timeout => Code::DeadlineExceeded,
        NodeError::TooLarge(_) => Code::InvalidArgument,
    };
    Status::new(code, error.to_string())
}

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Self {
        from_node_error(&error)
    }
}

/// A request that was not handled yet: this agent is not a member.
pub fn not_member() -> Status {
    Status::unavailable(NodeError::NotMember.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_contract() {
        let cases = [
            (NodeError::Rejected(Rejection::UnknownVm("a".into())), Code::NotFound),
            (NodeError::Rejected(Rejection::DuplicateVm("a".into())), Code::AlreadyExists),
            (NodeError::Rejected(Rejection::InvalidValue("x".into())), Code::InvalidArgument),
            (NodeError::Rejected(Rejection::LastVoter(1)), Code::FailedPrecondition),
            (NodeError::NoLeader, Code::Unavailable),
            (NodeError::NotMember, Code::Unavailable),
            (NodeError::NotLeader { leader: None }, Code::Unavailable),
            (NodeError::Timeout, Code::DeadlineExceeded),
            (NodeError::Unknown, Code::Aborted),
            (NodeError::Dropped, Code::Aborted),
        ];
        for (error, code) in cases {
            let status = from_node_error(&error);
            assert_eq!(status.code(), code, "{error}");
            assert!(!status.message().contains('\n'));
        }
    }
}
