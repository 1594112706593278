//! OIDC bearer tokens: JWTs of one issuer, for one audience, signed by a key of its JWKS (a
//! file, reloaded when it changes). Only asymmetric algorithms are taken, each only with a key
//! of its own type (RS*/PS* with RSA, ES* with EC, EdDSA with OKP): `alg: none`, HS256 signed
//! with a public key, an unknown `kid`, an expired or not-yet-valid token, another issuer or
//! audience are all refused. Claims name the principal, its kind, tenants, roles and mode.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use runtimeai_model::{AgentMode, Principal, PrincipalKind, Role};

use crate::auth::AuthFailure;

/// Where tokens come from and which claims say what.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: PathBuf,
    /// The claim naming the principal [default: sub].
    pub name_claim: String,
    /// A list (or one string) of tenants [default: tenants].
    pub tenants_claim: String,
    /// A list of roles (`viewer`, `operator`, ...) [default: roles].
    pub roles_claim: String,
    /// `human`, `agent` or `service` [default: kind; absent: human].
    pub kind_claim: String,
    /// For agents: `read_only`, `suggest_only` or `act` [default: agent_mode].
    pub agent_mode_claim: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot read the JWKS file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a JWKS document: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// Tokens checked and mapped so far, by the token's text, until they expire (bounded: cleared
/// when full). A cached token costs a map lookup: no signature check, no disk read.
const CACHE_LIMIT: usize = 10_000;

pub struct Oidc {
    config: OidcConfig,
    keys: RwLock<JwkSet>,
    modified: Mutex<Option<SystemTime>>,
    cache: Mutex<HashMap<String, (Principal, u64)>>,
}

impl Oidc {
    pub fn new(config: OidcConfig) -> Result<Oidc, OidcError> {
        let keys = read_jwks(&config.jwks_file)?;
        let modified = std::fs::metadata(&config.jwks_file).and_then(|m| m.modified()).ok();
        Ok(Oidc { config, keys: RwLock::new(keys), modified: Mutex::new(modified), cache: Mutex::default() })
    }

    /// Re-reads the JWKS file if it changed (or `force`); a bad file is logged and the keys
    /// stay as they were.
    pub fn reload(&self, force: bool) -> bool {
        let modified = std::fs::metadata(&self.config.jwks_file).and_then(|m| m.modified()).ok();
        let mut seen = self.modified.lock().expect("jwks lock");
        if !force && modified == *seen {
            return false;
        }
        *seen = modified;
        match read_jwks(&self.config.jwks_file) {
            Ok(keys) => {
                *self.keys.write().expect("jwks lock") = keys;
                self.cache.lock().expect("token cache lock").clear();
                tracing::info!(file = %self.config.jwks_file.display(), "reloaded the OIDC keys");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the OIDC keys; keeping the previous ones");
                false
            }
        }
    }

    /// The principal of a valid token.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthFailure> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some((principal, expiry)) = self.cache.lock().expect("token cache lock").get(token) {
            if now < *expiry {
                return Ok(principal.clone());
            }
        }
        let claims = self.verify(token)?;
        let principal = self.principal(&claims).ok_or(AuthFailure::Malformed)?;
        let expiry = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
        let mut cache = self.cache.lock().expect("token cache lock");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(token.to_string(), (principal.clone(), expiry));
        Ok(principal)
    }

    /// The token's claims, if its signature, issuer, audience and times check out.
    fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, AuthFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        let keys = self.keys.read().expect("jwks lock");
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or(AuthFailure::UnknownKey)?;
        let fits = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => matches!(
                header.alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            AlgorithmParameters::EllipticCurve(_) => matches!(header.alg, Algorithm::ES256 | Algorithm::ES384),
            AlgorithmParameters::OctetKeyPair(_) => header.alg == Algorithm::EdDSA,
            AlgorithmParameters::OctetKey(_) => false,
        };
        if !fits {
            return Err(AuthFailure::WrongSecret);
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthFailure::UnknownKey)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature
                | jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthFailure::Expired,
                _ => AuthFailure::WrongSecret,
            })
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Option<Principal> {
        let strings = |claim: &str| -> Vec<String> {
            match claims.get(claim) {
                Some(Value::String(one)) => vec![one.clone()],
                Some(Value::Array(many)) => many.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            }
        };
        let name = claims.get(&self.config.name_claim)?.as_str()?.to_string();
        let kind: PrincipalKind =
            claims.get(&self.config.kind_claim).and_then(Value::as_str).map_or(Some(PrincipalKind::Human), parse)?;
        // Unknown roles grant nothing.
        let roles: Vec<Role> = strings(&self.config.roles_claim).iter().filter_map(|r| parse(r)).collect();
        let agent_mode: Option<AgentMode> =
            claims.get(&self.config.agent_mode_claim).and_then(Value::as_str).and_then(parse);
        Some(Principal { name, kind, tenants: strings(&self.config.tenants_claim), roles, agent_mode })
    }
}

impl runtimeai_raft::tls::Reload for Oidc {
    fn reload(&self, force: bool) -> bool {
        Oidc::reload(self, force)
    }
}

/// A claim's text as one of our enums (`"operator"` → `Role::Operator`).
fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    serde_json::from_value(Value::String(text.to_string())).ok()
}

fn read_jwks(path: &std::path::Path) -> Result<JwkSet, OidcError> {
    let text = std::fs::read_to_string(path).map_err(|source| OidcError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| OidcError::Parse { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://idp.example.com";
    const AUDIENCE: &str = "runtimeai";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An ES256 key: its signing key and its JWK.
    fn ec_key(kid: &str) -> (EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])});
        (EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(), jwk)
    }

    /// An Ed25519 key: its signing key and its JWK.
    fn ed_key(kid: &str) -> (EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key_raw())});
        (EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(), jwk)
    }

    fn oidc(dir: &tempfile::TempDir, keys: &[&Value]) -> Oidc {
        let jwks_file = dir.path().join("jwks.json");
        std::fs::write(&jwks_file, json!({ "keys": keys }).to_string()).unwrap();
        let claim = |name: &str| name.to_string();
        Oidc::new(OidcConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks_file,
            name_claim: claim("sub"),
            tenants_claim: claim("tenants"),
            roles_claim: claim("roles"),
            kind_claim: claim("kind"),
            agent_mode_claim: claim("agent_mode"),
        })
        .unwrap()
    }

    fn claims(changes: Value) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 600, "iat": now,
            "tenants": ["acme"], "roles": ["operator", "no_such_role"]});
        for (key, value) in changes.as_object().unwrap() {
            claims[key] = value.clone();
        }
        claims
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let header = Header { kid: Some(kid.into()), ..Header::new(alg) };
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    #[test]
    fn a_valid_token_of_each_key_type_names_its_principal_from_its_claims() {
        let dir = tempfile::tempdir().unwrap();
        let ((ec, ec_jwk), (ed, ed_jwk)) = (ec_key("ec1"), ed_key("ed1"));
        let oidc = oidc(&dir, &[&ec_jwk, &ed_jwk]);
        let principal = oidc.authenticate(&sign(Algorithm::ES256, "ec1", &ec, &claims(json!({})))).unwrap();
        assert_eq!(principal.actor().to_string(), "human:alice");
        assert_eq!((principal.tenants, principal.roles), (vec!["acme".to_string()], vec![Role::Operator]));
        let agent = claims(json!({"sub": "bot", "kind": "agent", "agent_mode": "act", "roles": ["agent"]}));
        let principal = oidc.authenticate(&sign(Algorithm::EdDSA, "ed1", &ed, &agent)).unwrap();
        assert_eq!((principal.kind, principal.mode()), (PrincipalKind::Agent, Some(AgentMode::Act)));
    }

    #[test]
    fn forged_stale_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ec, ec_jwk) = ec_key("ec1");
        let oidc = oidc(&dir, &[&ec_jwk]);
        let now = jsonwebtoken::get_current_timestamp();
        let refused = |token: &str| oidc.authenticate(token).unwrap_err();

        let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"ec1"}"#);
        let body = b64(claims(json!({})).to_string().as_bytes());
        assert_eq!(refused(&format!("{none_header}.{body}.")), AuthFailure::Malformed, "alg: none");

        // HS256 keyed with the public key (the classic confusion attack).
        let public = ec_jwk["x"].as_str().unwrap().to_string() + ec_jwk["y"].as_str().unwrap();
        let hs = sign(Algorithm::HS256, "ec1", &EncodingKey::from_secret(public.as_bytes()), &claims(json!({})));
        assert_eq!(refused(&hs), AuthFailure::WrongSecret, "HS256 with the public key");

        let (other, _) = ec_key("ec1");
        assert_eq!(refused(&sign(Algorithm::ES256, "ec1", &other, &claims(json!({})))), AuthFailure::WrongSecret);
        assert_eq!(refused(&sign(Algorithm::ES256, "nope", &ec, &claims(json!({})))), AuthFailure::UnknownKey);
        let expired = claims(json!({"exp": now - 3600}));
        assert_eq!(refused(&sign(Algorithm::ES256, "ec1", &ec, &expired)), AuthFailure::Expired);
        let early = claims(json!({"nbf": now + 3600}));
        assert_eq!(refused(&sign(Algorithm::ES256, "ec1", &ec, &early)), AuthFailure::Expired, "not yet valid");
        for foreign in [json!({"iss": "https://evil.example.com"}), json!({"aud": "someone-else"})] {
            assert_eq!(
                refused(&sign(Algorithm::ES256, "ec1", &ec, &claims(foreign.clone()))),
                AuthFailure::WrongSecret,
                "{foreign}"
            );
        }
        let no_exp = {
            let mut c = claims(json!({}));
            c.as_object_mut().unwrap().remove("exp");
            c
        };
        assert!(oidc.authenticate(&sign(Algorithm::ES256, "ec1", &ec, &no_exp)).is_err(), "exp is required");
    }

    #[test]
    fn a_rotated_key_set_is_read_again_and_the_old_keys_tokens_stop_working() {
        let dir = tempfile::tempdir().unwrap();
        let ((old, old_jwk), (new, new_jwk)) = (ec_key("k1"), ec_key("k2"));
        let oidc = oidc(&dir, &[&old_jwk]);
        let old_token = sign(Algorithm::ES256, "k1", &old, &claims(json!({})));
        assert!(oidc.authenticate(&old_token).is_ok());
        std::fs::write(dir.path().join("jwks.json"), json!({"keys": [new_jwk]}).to_string()).unwrap();
        assert!(oidc.reload(true));
        assert_eq!(oidc.authenticate(&old_token).unwrap_err(), AuthFailure::UnknownKey, "the cache was dropped");
        assert!(oidc.authenticate(&sign(Algorithm::ES256, "k2", &new, &claims(json!({})))).is_ok());
        std::fs::write(dir.path().join("jwks.json"), "not json").unwrap();
        assert!(!oidc.reload(true), "a bad file keeps the keys");
        assert!(oidc.authenticate(&sign(Algorithm::ES256, "k2", &new, &claims(json!({})))).is_ok());
    }
}
