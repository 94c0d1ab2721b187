//! Properties of hostile input, as functions over arbitrary bytes that
//! panic when a property fails. The cargo-fuzz targets (`fuzz/`) and the
//! proptest tests (below, run by `cargo test`) check the same functions,
//! so a fuzzer's crash input replays as an ordinary test.
//!
//! - [`config_text`]: any config text is accepted or refused with an
//!   error; an accepted config holds only valid names.
//! - [`vm_create_request`]: any bytes on the client API's `VmCreate` decode
//!   or not; a request the edge accepts is one apply accepts too, and the
//!   edge refuses every name apply would.
//! - [`commands`]: any sequence of encoded state commands decodes or not;
//!   applying them keeps the state's invariants, and a rejected command
//!   changes nothing.

use prost::Message as _;

use crate::api::pb;
use crate::config::{Config, FileConfig, Overrides};
use crate::state::{Command, CommandKind, Member, State, codec};

/// Parsing and resolving `text` as a config file never panics; what is
/// accepted has valid names.
pub fn config_text(text: &str) {
    let Ok(file) = FileConfig::parse(text) else { return };
    let Ok(config) = Config::resolve(file, Overrides::default()) else { return };
    assert!(crate::names::validate(&config.node_name).is_ok(), "accepted node_name {:?}", config.node_name);
    for vm in &config.vms {
        assert!(crate::names::validate(&vm.name).is_ok(), "accepted VM name {:?}", vm.name);
    }
    for member in &config.initial_members {
        assert!(crate::names::validate(&member.name).is_ok(), "accepted member name {:?}", member.name);
    }
}

/// The edge check of `VmCreate` agrees with apply.
pub fn vm_create_request(bytes: &[u8]) {
    let Ok(request) = pb::VmCreateRequest::decode(bytes) else { return };
    match crate::api::service::spec_of(&request) {
        Ok(spec) => {
            assert!(crate::names::validate(&request.name).is_ok(), "the edge accepted {:?}", request.name);
            let mut state = State::default();
            let command = Command { at_unix_ms: 1, kind: CommandKind::CreateVm { name: request.name.clone(), spec } };
            if let Err(rejection) = state.apply(&command) {
                panic!("the edge accepted a create that apply rejects: {rejection}");
            }
            assert_eq!(state.validate(), Ok(()));
        }
        Err(status) => assert!(status.message().len() <= 1024, "an error echoes too much: {}", status.message().len()),
    }
}

/// Commands framed as `[len: u8][len bytes]...`, decoded and applied to a
/// three-member state.
pub fn commands(bytes: &[u8]) {
    let mut state = State::with_members([
        Member::new(1, "h1", "127.0.0.1:7001"),
        Member::new(2, "h2", "127.0.0.1:7002"),
        Member::new(3, "h3", "127.0.0.1:7003"),
    ]);
    let mut rest = bytes;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        rest = tail;
        let Ok(command) = codec::decode_command(frame) else { continue };
        // What decodes re-encodes to something that decodes the same.
        let again = codec::decode_command(&codec::encode_command(&command)).expect("a re-encoded command decodes");
        assert_eq!(again, command);
        let before = state.clone();
        match state.apply(&command) {
            Ok(_) => {
                if let Err(e) = state.validate() {
                    panic!("{command:?} broke an invariant: {e}");
                }
            }
            Err(_) => assert!(state == before, "a rejected command changed the state: {command:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::state::{Desired, VmSpec};

    /// Bytes that are often a valid command: real commands, encoded, with
    /// some bytes flipped.
    fn command_frames() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof!["[a-z0-9][a-z0-9-]{0,8}", ".{0,70}", Just("../x".to_string())];
        let kind = (name, 0u32..2000, 0u64..(1 << 25), any::<bool>(), 0u64..5).prop_map(
            |(name, vcpu, memory_mib, stopped, node)| match node {
                0 => CommandKind::CreateVm {
                    name,
                    spec: VmSpec {
                        vcpu,
                        memory_mib,
                        desired: if stopped { Desired::Stopped } else { Desired::Running },
                        ..VmSpec::default()
                    },
                },
                1 => CommandKind::DeleteVm { name },
                _ => CommandKind::SetDesired { name, desired: Desired::Stopped },
            },
        );
        let frame = (kind, proptest::collection::vec(any::<(u8, u8)>(), 0..3)).prop_map(|(kind, flips)| {
            let mut bytes = codec::encode_command(&Command { at_unix_ms: 5, kind });
            for (at, bit) in flips {
                if !bytes.is_empty() {
                    let i = usize::from(at) % bytes.len();
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            bytes.truncate(255);
            let mut framed = vec![bytes.len() as u8];
            framed.extend(bytes);
            framed
        });
        proptest::collection::vec(frame, 0..12).prop_map(|frames| frames.concat())
    }

    /// Found by `cargo fuzz run request_validation`: a long label key of
    /// control characters was echoed whole (escaped, six bytes each) in the
    /// refusal.
    #[test]
    fn a_long_hostile_label_key_is_not_echoed_whole() {
        let labels = [("\u{7f}".repeat(300), "v".to_string())].into_iter().collect();
        let request = pb::VmCreateRequest { name: "web".into(), vcpu: 1, memory_mib: 64, labels, ..Default::default() };
        vm_create_request(&request.encode_to_vec());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_config_text_is_accepted_or_refused(text in ".{0,200}") {
            config_text(&text);
            config_text(&format!("node_name = {text:?}\nlisten = \"127.0.0.1:7000\"\n"));
        }

        #[test]
        fn any_vm_create_bytes_agree_with_apply(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            vm_create_request(&bytes);
        }

        #[test]
        fn edge_and_apply_agree_on_create_requests(
            name in prop_oneof!["[a-z0-9][a-z0-9-]{0,70}", ".{0,80}"],
            vcpu in 0u32..2000,
            memory_mib in prop_oneof![0u64..100, Just(u64::MAX), 0u64..(1 << 26)],
            labels in proptest::collection::btree_map(".{0,70}", ".{0,300}", 0..40),
        ) {
            let request = pb::VmCreateRequest { name, vcpu, memory_mib, labels: labels.into_iter().collect(), ..Default::default() };
            vm_create_request(&request.encode_to_vec());
        }

        #[test]
        fn applying_decoded_commands_keeps_the_invariants(bytes in command_frames()) {
            commands(&bytes);
        }

        #[test]
        fn applying_random_bytes_keeps_the_invariants(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            commands(&bytes);
        }
    }
}
