//! Who is asking, and may they: bearer tokens mapped to users, as the API server's token
//! authenticator does, and a deny list standing in for RBAC.
//!
//! The fake's simplifications: a request without an `Authorization` header is the admin user
//! `kubernetes-admin` (so tests that do not care about identity need no token), and everything
//! not denied is allowed. A header with an unknown token, or not a bearer token, is `401`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::status::ApiError;
use crate::store::Kind;

/// The identity the API server attaches to a request (and copies into a CSR's spec).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInfo {
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Every authenticated user is in this group, as the real server adds it.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// The user of requests without credentials (the fake's simplification).
pub const ADMIN_USER: &str = "kubernetes-admin";

impl UserInfo {
    pub fn new(username: impl Into<String>) -> UserInfo {
        UserInfo {
            username: username.into(),
            ..UserInfo::default()
        }
    }

    /// The admin user of requests without an `Authorization` header.
    pub fn admin() -> UserInfo {
        UserInfo {
            username: ADMIN_USER.to_owned(),
            groups: vec!["system:masters".to_owned(), AUTHENTICATED_GROUP.to_owned()],
            ..UserInfo::default()
        }
    }

    /// The user as the authenticator hands it on: in `system:authenticated`.
    fn authenticated(mut self) -> UserInfo {
        if !self.groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
            self.groups.push(AUTHENTICATED_GROUP.to_owned());
        }
        self
    }
}

/// An RBAC verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What RBAC names as a resource: a kind, or one of its subresources
/// (`certificatesigningrequests/approval` is separate from `certificatesigningrequests`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    pub kind: Kind,
    pub subresource: Option<String>,
}

impl Resource {
    pub fn sub(kind: Kind, subresource: &str) -> Resource {
        Resource {
            kind,
            subresource: Some(subresource.to_owned()),
        }
    }
}

impl From<Kind> for Resource {
    fn from(kind: Kind) -> Resource {
        Resource {
            kind,
            subresource: None,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subresource {
            Some(sub) => write!(f, "{}/{sub}", self.kind.plural()),
            None => f.write_str(self.kind.plural()),
        }
    }
}

/// Where a request points, for the authorizer's answer.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

/// The token table and the deny list.
#[derive(Debug, Default)]
pub struct Access {
    tokens: HashMap<String, UserInfo>,
    denied: HashSet<(String, Verb, Resource)>,
}

impl Access {
    pub fn add_user(&mut self, token: &str, user: UserInfo) {
        self.tokens.insert(token.to_owned(), user);
    }

    /// From now on `username` may not `verb` the resource.
    pub fn deny(&mut self, username: &str, verb: Verb, resource: Resource) {
        self.denied.insert((username.to_owned(), verb, resource));
    }

    /// Lifts every denial.
    pub fn allow_all(&mut self) {
        self.denied.clear();
    }

    /// The user behind an `Authorization` header value (`None`: no header).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<UserInfo, ApiError> {
        let Some(header) = authorization else {
            return Ok(UserInfo::admin());
        };
        let header = std::str::from_utf8(header).map_err(|_| ApiError::unauthorized())?;
        let (scheme, token) = header
            .trim()
            .split_once(' ')
            .ok_or_else(ApiError::unauthorized)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::unauthorized());
        }
        self.tokens
            .get(token.trim())
            .cloned()
            .map(UserInfo::authenticated)
            .ok_or_else(ApiError::unauthorized)
    }

    /// `403 Forbidden` if `user` is denied `verb` on `resource`.
    pub fn authorize(
        &self,
        user: &UserInfo,
        verb: Verb,
        resource: &Resource,
        scope: Scope<'_>,
    ) -> Result<(), ApiError> {
        // A cheap probe first: most runs deny nothing.
        if self.denied.is_empty()
            || !self
                .denied
                .contains(&(user.username.clone(), verb, resource.clone()))
        {
            return Ok(());
        }
        Err(ApiError::forbidden(
            resource.kind,
            scope.name,
            scope.namespace,
            &user.username,
            verb.as_str(),
            &resource.to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        let mut a = Access::default();
        a.add_user(
            "t-a",
            UserInfo {
                username: "system:serviceaccount:kube-system:kubenft-agent".into(),
                uid: "u-1".into(),
                groups: vec!["system:serviceaccounts".into()],
                extra: BTreeMap::from([(
                    "authentication.kubernetes.io/node-name".into(),
                    vec!["a".into()],
                )]),
            },
        );
        a
    }

    #[test]
    fn tokens_name_users_and_anything_else_is_401() {
        let a = access();
        let user = a.authenticate(Some(b"Bearer t-a")).unwrap();
        assert_eq!(
            user.username,
            "system:serviceaccount:kube-system:kubenft-agent"
        );
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", AUTHENTICATED_GROUP],
            "the authenticated group is added"
        );
        assert_eq!(a.authenticate(None).unwrap().username, ADMIN_USER);
        for bad in [&b"Bearer nope"[..], b"Basic dTpw", b"Bearer", b"\xff"] {
            assert_eq!(a.authenticate(Some(bad)).unwrap_err().code, 401);
        }
    }

    #[test]
    fn denials_name_the_user_verb_and_resource() {
        let mut a = access();
        let user = a.authenticate(Some(b"Bearer t-a")).unwrap();
        let approval = Resource::sub(Kind::CertificateSigningRequest, "approval");
        let scope = Scope {
            name: Some("csr-1"),
            namespace: None,
        };
        assert!(a.authorize(&user, Verb::Update, &approval, scope).is_ok());
        a.deny(&user.username, Verb::Update, approval.clone());
        let e = a
            .authorize(&user, Verb::Update, &approval, scope)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        assert!(
            e.message.contains(
                r#"cannot update resource "certificatesigningrequests/approval" in API group "certificates.k8s.io" at the cluster scope"#
            ),
            "{}",
            e.message
        );
        // The main resource is another RBAC resource.
        let main = Resource::from(Kind::CertificateSigningRequest);
        assert!(a.authorize(&user, Verb::Update, &main, scope).is_ok());
        a.allow_all();
        assert!(a.authorize(&user, Verb::Update, &approval, scope).is_ok());
    }
}
