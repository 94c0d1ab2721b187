//! The page's actions: start, stop, migrate, drain and undrain, for a
//! connection that may act (`access`).
//!
//! There is no second implementation of any command here: an action is
//! the client API's own request (`pb::VmRequest`, `pb::VmMigrateRequest`,
//! `pb::NodeRequest`) handed to the same handler the gRPC port calls
//! (`api::service::BlixardService`), so it is validated, routed to the
//! leader and applied exactly as the CLI's; its answer is worded by the
//! CLI's own functions (`cli::output::vm_written`, `node_written`, and
//! `api::client::server_error` for a refusal). Each answer also gives the
//! equivalent CLI command.
//!
//! `POST /api/actions` with a JSON body, e.g. `{"action": "vm_migrate",
//! "vm": "web", "to": "h2"}`; it answers `{"ok", "message", "cli",
//! "class"}` (`class`: `rejected` for a request the cluster refuses as
//! invalid, `failed` for one that did not happen, as the CLI's exit codes
//! 2 and 1).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::Request;

use super::access::Access;
use crate::api::client::{ErrorClass, server_error};
use crate::api::context::Context;
use crate::api::pb;
use crate::api::pb::blixard_server::Blixard as _;
use crate::api::service::BlixardService;
use crate::cli::output::{node_written, vm_written};

/// How long an action may take (the CLI's default `--timeout`).
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request body accepted.
pub const ACTION_BODY_BYTES_MAX: usize = 4096;

/// The body of `POST /api/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

/// One action, its arguments checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    VmStart { vm: String },
    VmStop { vm: String },
    VmMigrate { vm: String, to: String },
    NodeDrain { node: String },
    NodeUndrain { node: String },
}

/// The answer of an action.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ActionResult {
    pub ok: bool,
    /// One sentence: the CLI's output or its error.
    pub message: String,
    /// The equivalent CLI command.
    pub cli: Option<String>,
    /// `rejected` or `failed` when not ok.
    pub class: Option<&'static str>,
}

impl ActionResult {
    pub fn refused(class: &'static str, message: String, cli: Option<String>) -> ActionResult {
        ActionResult { ok: false, message, cli, class: Some(class) }
    }
}

fn name_of(what: &str, field: &str, value: Option<String>) -> Result<String, String> {
    let value = value.ok_or_else(|| format!("{field} is missing: which {what}?"))?;
    crate::names::validate(&value)
        .map_err(|e| format!("invalid {what} name {}: {e}", crate::api::service::quoted(&value)))?;
    Ok(value)
}

impl Action {
    /// Checks a request's arguments, as the CLI's parsers do before it
    /// connects (the handler checks them again).
    pub fn parse(request: ActionRequest) -> Result<Action, String> {
        let ActionRequest { action, vm, node, to } = request;
        let unexpected = |field: &str, present: bool| {
            if present { Err(format!("{action} takes no {field}")) } else { Ok(()) }
        };
        match action.as_str() {
            "vm_start" | "vm_stop" => {
                unexpected("node", node.is_some())?;
                unexpected("to", to.is_some())?;
                let vm = name_of("VM", "vm", vm)?;
                Ok(if action == "vm_start" { Action::VmStart { vm } } else { Action::VmStop { vm } })
            }
            "vm_migrate" => {
                unexpected("node", node.is_some())?;
                Ok(Action::VmMigrate { vm: name_of("VM", "vm", vm)?, to: name_of("node", "to", to)? })
            }
            "node_drain" | "node_undrain" => {
                unexpected("vm", vm.is_some())?;
                unexpected("to", to.is_some())?;
                let node = name_of("node", "node", node)?;
                Ok(if action == "node_drain" { Action::NodeDrain { node } } else { Action::NodeUndrain { node } })
            }
            other => Err(format!(
                "unknown action {}: one of vm_start, vm_stop, vm_migrate, node_drain, node_undrain",
                crate::api::service::quoted(other)
            )),
        }
    }

    /// In words, for refusals and the log: `vm start`.
    pub fn what(&self) -> &'static str {
        match self {
            Action::VmStart { .. } => "vm start",
            Action::VmStop { .. } => "vm stop",
            Action::VmMigrate { .. } => "vm migrate",
            Action::NodeDrain { .. } => "node drain",
            Action::NodeUndrain { .. } => "node undrain",
        }
    }

    /// The CLI command that does the same, against this agent.
    pub fn cli(&self, endpoint: &str) -> String {
        let args = match self {
            Action::VmStart { vm } => format!("vm start {vm}"),
            Action::VmStop { vm } => format!("vm stop {vm}"),
            Action::VmMigrate { vm, to } => format!("vm migrate {vm} --to {to}"),
            Action::NodeDrain { node } => format!("node drain {node}"),
            Action::NodeUndrain { node } => format!("node undrain {node}"),
        };
        format!("blixard-agent {args} --endpoint {endpoint}")
    }

    /// Runs the action through the client API's handler.
    async fn run(self, context: Arc<Context>) -> Result<String, tonic::Status> {
        let service = BlixardService::new(context);
        let vm = |name: String| Request::new(pb::VmRequest { name });
        let node = |name: String| Request::new(pb::NodeRequest { name });
        Ok(match self {
            Action::VmStart { vm: name } => vm_written("started", &service.vm_start(vm(name)).await?.into_inner()),
            Action::VmStop { vm: name } => vm_written("stopped", &service.vm_stop(vm(name)).await?.into_inner()),
            Action::VmMigrate { vm: name, to } => {
                let request = Request::new(pb::VmMigrateRequest { name, to });
                vm_written("migrating", &service.vm_migrate(request).await?.into_inner())
            }
            Action::NodeDrain { node: name } => {
                node_written("draining", &service.node_drain(node(name)).await?.into_inner())
            }
            Action::NodeUndrain { node: name } => {
                node_written("undrained", &service.node_undrain(node(name)).await?.into_inner())
            }
        })
    }
}

fn class_word(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Rejected => "rejected",
        ErrorClass::Failed => "failed",
    }
}

/// Performs `request` for `access`: the role check, the argument check,
/// then the client API's handler.
pub async fn perform(context: Arc<Context>, access: &Access, request: ActionRequest) -> ActionResult {
    let action = match Action::parse(request) {
        Ok(action) => action,
        Err(message) => return ActionResult::refused("rejected", message, None),
    };
    let cli = action.cli(&context.address);
    if let Err(message) = access.may_act(action.what()) {
        return ActionResult::refused("forbidden", message, Some(cli));
    }
    tracing::info!(target: "blixard::decision", action = action.what(), by = access.who(), "dashboard: {cli}");
    match tokio::time::timeout(ACTION_TIMEOUT, action.run(context)).await {
        Err(_) => ActionResult::refused(
            "failed",
            format!("timed out after {} s; it may still happen", ACTION_TIMEOUT.as_secs()),
            Some(cli),
        ),
        Ok(Ok(output)) => {
            ActionResult { ok: true, message: output.trim_end().to_string(), cli: Some(cli), class: None }
        }
        Ok(Err(status)) => {
            let error = server_error(&status);
            ActionResult::refused(class_word(error.class), error.message, Some(cli))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(action: &str, vm: Option<&str>, node: Option<&str>, to: Option<&str>) -> ActionRequest {
        ActionRequest {
            action: action.into(),
            vm: vm.map(str::to_string),
            node: node.map(str::to_string),
            to: to.map(str::to_string),
        }
    }

    #[test]
    fn actions_are_checked_like_the_cli_arguments() {
        let migrate = Action::parse(request("vm_migrate", Some("web"), None, Some("h2"))).unwrap();
        assert_eq!(migrate, Action::VmMigrate { vm: "web".into(), to: "h2".into() });
        assert_eq!(migrate.cli("10.0.0.1:7000"), "blixard-agent vm migrate web --to h2 --endpoint 10.0.0.1:7000");
        assert_eq!(
            Action::parse(request("node_drain", None, Some("h3"), None)).unwrap().cli("h:1"),
            "blixard-agent node drain h3 --endpoint h:1"
        );
        let refused = [
            request("vm_start", None, None, None),
            request("vm_start", Some("../x"), None, None),
            request("vm_stop", Some("web"), Some("h1"), None),
            request("vm_migrate", Some("web"), None, None),
            request("node_undrain", Some("web"), Some("h1"), None),
            request("vm_delete", Some("web"), None, None),
        ];
        for r in refused {
            let text = format!("{r:?}");
            assert!(Action::parse(r).is_err(), "{text}");
        }
        let long = "x".repeat(500);
        let error = Action::parse(request(&long, None, None, None)).unwrap_err();
        assert!(error.len() < 200, "a hostile action name is not echoed whole: {error}");
    }
}
