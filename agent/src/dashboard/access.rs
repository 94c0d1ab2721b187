//! Who is looking at the dashboard, and what they may do: the one place
//! that decides it ([`access_of`], [`Access::may_view`], [`Access::may_act`]).
//!
//! | authentication | connection | sees | acts |
//! |---|---|---|---|
//! | off (`insecure`) | plain HTTP | everything | nothing: the page is read-only |
//! | on | HTTPS, no client certificate | `/healthz`, `/readyz`, `/metrics` | nothing |
//! | on | a read-only client certificate | everything | nothing (no action buttons) |
//! | on | an admin client certificate, or a member's | everything | start, stop, migrate, drain, undrain |
//!
//! With authentication on, the listener speaks HTTPS with this agent's
//! member certificate and verifies a client certificate against the
//! cluster's CA when the browser presents one (`api::tls`); a certificate
//! of the CA is told apart by its blixard identity exactly as on the gRPC
//! port: `urn:blixard:member:NAME` (an admin), `urn:blixard:client:NAME`
//! with `urn:blixard:role:read-only` or `urn:blixard:role:admin` (no role
//! name: an admin, as certificates made before roles existed).
//!
//! Actions then go through the client API's own handlers
//! (`dashboard::actions`), so the cluster validates them as it validates
//! the CLI's.

use std::net::SocketAddr;

use crate::api::tls::Role;

/// What one connection may do with the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Authentication is off: anyone who reaches the listener reads, and
    /// nobody acts.
    Open,
    /// Authentication is on and no client certificate was presented.
    Anonymous,
    /// A certificate of the cluster CA that speaks for nobody.
    Refused { why: String },
    /// A read-only client.
    ReadOnly { name: String },
    /// An admin client, or a member.
    Admin { name: String },
}

impl Access {
    /// Whether the page and its data may be shown; the refusal says why
    /// in one sentence.
    pub fn may_view(&self) -> Result<(), String> {
        match self {
            Access::Open | Access::ReadOnly { .. } | Access::Admin { .. } => Ok(()),
            Access::Anonymous => Err("this dashboard needs a client certificate of the cluster (authentication is \
                 on): import one into the browser, made with `blixard-agent certs client NAME`"
                .into()),
            Access::Refused { why } => Err(format!("the client certificate is refused: {why}")),
        }
    }

    /// Whether this connection may change the cluster (`what`, in words);
    /// the refusal says why in one sentence.
    pub fn may_act(&self, what: &str) -> Result<(), String> {
        match self {
            Access::Admin { .. } => Ok(()),
            Access::Open => Err(format!(
                "{what} is not offered here: this agent runs without authentication, so its dashboard is read-only; \
                 use the CLI"
            )),
            Access::ReadOnly { name } => Err(format!(
                "{what} changes the cluster, and the client certificate of {name:?} is read-only; use an admin \
                 certificate"
            )),
            Access::Anonymous | Access::Refused { .. } => Err(self.may_view().err().unwrap_or_default()),
        }
    }

    /// Who, for the log of an action and the page's header.
    pub fn who(&self) -> String {
        match self {
            Access::Open => "anyone (no authentication)".into(),
            Access::Anonymous => "nobody (no client certificate)".into(),
            Access::Refused { .. } => "a refused certificate".into(),
            Access::ReadOnly { name } => format!("{name} (read-only)"),
            Access::Admin { name } => format!("{name} (admin)"),
        }
    }

    /// `open`, `read-only`, `admin` or `none`: for the page's script.
    pub fn word(&self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::ReadOnly { .. } => "read-only",
            Access::Admin { .. } => "admin",
            Access::Anonymous | Access::Refused { .. } => "none",
        }
    }
}

/// The access of a TLS connection whose verified client certificate (leaf,
/// DER) is `leaf`: `None` when the browser presented none.
pub fn access_of(leaf: Option<&[u8]>) -> Access {
    let Some(der) = leaf else { return Access::Anonymous };
    // The same reading of a certificate as the gRPC API's (members and
    // clients without a role are admins; a member naming a role is refused).
    match crate::api::tls::identity_of_der(der) {
        Ok(identity) => match identity.role {
            Role::Admin => Access::Admin { name: identity.name },
            Role::ReadOnly => Access::ReadOnly { name: identity.name },
        },
        Err(why) => Access::Refused { why },
    }
}

/// What the HTTP listener knows of a connection: where it comes from and
/// what it may do (axum's connect info, see `http`).
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub access: Access,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn roles_come_from_the_certificate() {
        assert_eq!(access_of(None), Access::Anonymous);
        let admin = access_of(Some(&cert(&["urn:blixard:client:alice"])));
        assert_eq!(admin, Access::Admin { name: "alice".into() });
        assert!(admin.may_act("vm start").is_ok());
        let explicit = access_of(Some(&cert(&["urn:blixard:client:bob", "urn:blixard:role:admin"])));
        assert_eq!(explicit, Access::Admin { name: "bob".into() });
        let ro = access_of(Some(&cert(&["urn:blixard:role:read-only", "urn:blixard:client:carol"])));
        assert_eq!(ro, Access::ReadOnly { name: "carol".into() });
        assert!(ro.may_view().is_ok());
        assert!(ro.may_act("vm start").unwrap_err().contains("read-only"));
        assert_eq!(access_of(Some(&cert(&["urn:blixard:member:h1"]))), Access::Admin { name: "h1".into() });
        for refused in [
            vec!["https://example.com"],
            vec!["urn:blixard:client:a", "urn:blixard:client:b"],
            vec!["urn:blixard:client:a", "urn:blixard:role:root"],
            vec!["urn:blixard:member:h1", "urn:blixard:role:read-only"],
            vec!["urn:blixard:client:../x"],
        ] {
            let access = access_of(Some(&cert(&refused)));
            assert!(matches!(access, Access::Refused { .. }), "{refused:?}: {access:?}");
            assert!(access.may_view().is_err() && access.may_act("x").is_err());
        }
        assert!(Access::Open.may_view().is_ok());
        assert!(Access::Open.may_act("vm stop").unwrap_err().contains("read-only"));
        assert!(Access::Anonymous.may_view().unwrap_err().contains("client certificate"));
    }
}
