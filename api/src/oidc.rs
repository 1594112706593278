//! OIDC bearer tokens: JWTs of one issuer, for one audience, signed by a key of its JWKS (a
//! file, reloaded when it changes, or a URL, fetched at start, every five minutes and soon
//! after a token names a key it lacks). Only asymmetric algorithms are taken, each only with a key
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
    pub jwks: JwksSource,
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

/// Where the issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// Fetched over HTTPS (or HTTP), cached; see [`keep_fresh`].
    Url(String),
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot fetch the JWKS from {url}: {reason}")]
    Fetch { url: String, reason: String },
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
    /// A token named a key the set lacks: a URL source is fetched again soon.
    key_missing: std::sync::atomic::AtomicBool,
}

impl Oidc {
    /// A verifier of `config`'s tokens. A JWKS file is read now (a bad one refuses the start);
    /// a URL is fetched by [`keep_fresh`] (until then every token is refused).
    pub fn new(config: OidcConfig) -> Result<Oidc, OidcError> {
        let (keys, modified) = match &config.jwks {
            JwksSource::File(path) => (read_jwks(path)?, std::fs::metadata(path).and_then(|m| m.modified()).ok()),
            JwksSource::Url(_) => (JwkSet { keys: Vec::new() }, None),
        };
        Ok(Oidc {
            config,
            keys: RwLock::new(keys),
            modified: Mutex::new(modified),
            cache: Mutex::default(),
            key_missing: Default::default(),
        })
    }

    /// Takes a new key set: tokens are checked against it from now on.
    fn replace_keys(&self, keys: JwkSet) {
        *self.keys.write().expect("jwks lock") = keys;
        self.cache.lock().expect("token cache lock").clear();
    }

    /// Fetches the key set from its URL (nothing for a file).
    pub async fn fetch(&self, client: &reqwest::Client) -> Result<(), OidcError> {
        let JwksSource::Url(url) = &self.config.jwks else { return Ok(()) };
        let failed = |reason: String| OidcError::Fetch { url: url.clone(), reason };
        let response = client.get(url).send().await.map_err(|e| failed(e.to_string()))?;
        let response = response.error_for_status().map_err(|e| failed(e.to_string()))?;
        let keys: JwkSet = response.json().await.map_err(|e| failed(e.to_string()))?;
        self.key_missing.store(false, std::sync::atomic::Ordering::Relaxed);
        self.replace_keys(keys);
        Ok(())
    }

    /// Re-reads the JWKS file if it changed (or `force`); a bad file is logged and the keys
    /// stay as they were.
    pub fn reload(&self, force: bool) -> bool {
        let JwksSource::File(path) = &self.config.jwks else { return false };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen = self.modified.lock().expect("jwks lock");
        if !force && modified == *seen {
            return false;
        }
        *seen = modified;
        match read_jwks(path) {
            Ok(keys) => {
                self.replace_keys(keys);
                tracing::info!(file = %path.display(), "reloaded the OIDC keys");
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
        };
        let Some(jwk) = jwk else {
            self.key_missing.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(AuthFailure::UnknownKey);
        };
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

/// Keeps a URL key set fresh until `stop`: fetched at start (every 5 s until it answers), every
/// five minutes, and — at most every 30 s — soon after a token names a key the set lacks (the
/// issuer rotated its keys).
pub async fn keep_fresh(oidc: std::sync::Arc<Oidc>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use std::time::{Duration, Instant};
    // A file is re-read by the certificate watcher (`Reload`); nothing to fetch.
    if matches!(oidc.config.jwks, JwksSource::File(_)) {
        return;
    }
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(10)).build() else { return };
    let mut last: Option<Instant> = None;
    loop {
        let due = match last {
            None => true,
            Some(at) => {
                at.elapsed() >= Duration::from_secs(300)
                    || (oidc.key_missing.load(std::sync::atomic::Ordering::Relaxed)
                        && at.elapsed() >= Duration::from_secs(30))
            }
        };
        if due {
            match oidc.fetch(&client).await {
                Ok(()) => {
                    last = Some(Instant::now());
                    tracing::info!("fetched the OIDC keys");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the OIDC keys; trying again");
                    last = last.map(|_| Instant::now() - Duration::from_secs(295));
                }
            }
        }
        let wait = if last.is_none() { Duration::from_secs(5) } else { Duration::from_secs(1) };
        tokio::select! {
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => return,
            _ = tokio::time::sleep(wait) => {}
        }
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
        with_source(JwksSource::File(jwks_file))
    }

    fn with_source(jwks: JwksSource) -> Oidc {
        let claim = |name: &str| name.to_string();
        Oidc::new(OidcConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks,
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

    #[tokio::test]
    async fn a_key_set_served_at_a_url_is_fetched_and_fetched_again_when_a_token_names_a_new_key() {
        let ((old, old_jwk), (new, new_jwk)) = (ec_key("u1"), ec_key("u2"));
        let served = std::sync::Arc::new(RwLock::new(json!({"keys": [old_jwk]})));
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get({
                let served = served.clone();
                move || async move { axum::Json(served.read().unwrap().clone()) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let oidc = std::sync::Arc::new(with_source(JwksSource::Url(url)));
        let old_token = sign(Algorithm::ES256, "u1", &old, &claims(json!({})));
        assert_eq!(oidc.authenticate(&old_token).unwrap_err(), AuthFailure::UnknownKey, "nothing fetched yet");

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let refresher = tokio::spawn(keep_fresh(oidc.clone(), stopped));
        let eventually = |token: String| {
            let oidc = oidc.clone();
            async move {
                for _ in 0..100 {
                    if oidc.authenticate(&token).is_ok() {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                false
            }
        };
        assert!(eventually(old_token).await, "fetched at start");

        // The issuer rotates: a token of the new key is refused until the set is fetched again.
        *served.write().unwrap() = json!({"keys": [new_jwk]});
        let new_token = sign(Algorithm::ES256, "u2", &new, &claims(json!({})));
        assert_eq!(oidc.authenticate(&new_token).unwrap_err(), AuthFailure::UnknownKey);
        assert!(oidc.key_missing.load(std::sync::atomic::Ordering::Relaxed), "the miss is noted");
        oidc.fetch(&reqwest::Client::new()).await.unwrap();
        assert!(oidc.authenticate(&new_token).is_ok());
        let _ = stop.send(true);
        refresher.await.unwrap();
    }
}
