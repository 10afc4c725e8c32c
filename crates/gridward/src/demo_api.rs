//! The demo's look at the HTTPS API: three users (an operator with TOTP, a consumer bound to
//! one meter, an auditor) log in over HTTPS and try what they may and may not see; each call is
//! printed as the `curl` line that does the same, with the answer the demo got.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use gridward_access::{Access, NewUser, Role, Secret};
use gridward_core::MeterId;
use gridward_pki::{LeafKind, Pki};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use time::OffsetDateTime;

/// An HTTPS client of the API (HTTP/1.1 over the Gridward TLS profile, no client certificate).
pub(crate) type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A password strong enough for the policy: 20 random letters and digits.
fn password() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
        .collect()
}

/// The TOTP code of `secret_base32` now (what an authenticator app shows).
pub(crate) fn totp_now(secret_base32: &str) -> Result<String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32)
        .map_err(|e| anyhow::anyhow!("TOTP secret: {e:?}"))?;
    let totp = totp_rs::Builder::new()
        .with_secret(secret.as_bytes().to_vec())
        .build()
        .map_err(|e| anyhow::anyhow!("TOTP: {e}"))?;
    let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
    Ok(totp.generate(now).to_string())
}

/// A client that trusts `pki_dir`'s CA and checks the API's certificate `server`; HTTP/1.1
/// with keep-alive, no client certificate (people log in with a session).
pub(crate) fn api_client(pki_dir: &Path, server: &str) -> Result<HttpsClient> {
    let material = Pki::open(pki_dir, None)?.tls_material(LeafKind::Server, server)?;
    let mut roots = rustls::RootCertStore::empty();
    for root in material.roots {
        roots.add(root)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(300))
        .build(connector))
}

async fn call(
    client: &HttpsClient,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("the API did not answer in 10 s")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Creates the demo users and shows what each may see. `own` is the consumer's meter,
/// `other` someone else's.
pub async fn show(
    access: &Access,
    api: std::net::SocketAddr,
    pki_dir: &Path,
    own: &MeterId,
    other: &MeterId,
) -> Result<()> {
    let base = format!("https://{api}");
    let ca = pki_dir.join("ca/chain.pem");
    let now = OffsetDateTime::now_utc();
    let client = api_client(pki_dir, "localhost")?;
    println!("4. the HTTPS API on {base}/api/v1 (TLS with the head-end's certificate)");

    let mut users = Vec::new();
    for (name, role, meters) in [
        ("otto", Role::Operator, vec![]),
        ("carol", Role::Consumer, vec![own.clone()]),
        ("alice", Role::Auditor, vec![]),
    ] {
        let pw = password();
        let enrolment = access.add_user(
            NewUser {
                username: name.to_owned(),
                role,
                meters,
                password: Secret::new(pw.clone()),
            },
            now,
        )?;
        let what = match role {
            Role::Consumer => format!("consumer of {own}"),
            r => r.as_str().to_owned(),
        };
        println!("   {name:<6} {what:<20} password {pw}");
        if let Some(e) = &enrolment {
            println!("          TOTP secret {} ({})", e.secret_base32, e.uri);
        }
        users.push((name, pw, enrolment.map(|e| e.secret_base32)));
    }

    let curl = format!("curl -s --cacert {}", ca.display());
    let mut tokens = Vec::new();
    for (name, pw, totp) in &users {
        let body = match totp {
            Some(secret) => format!(
                r#"{{"username":"{name}","password":"{pw}","totp":"{}"}}"#,
                totp_now(secret)?
            ),
            None => format!(r#"{{"username":"{name}","password":"{pw}"}}"#),
        };
        let (status, answer) =
            call(&client, &base, "POST", "/api/v1/session", None, Some(&body)).await?;
        let token = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
            .with_context(|| format!("logging in {name}: {status} {answer}"))?;
        let upper = name.to_uppercase();
        println!(
            "   {upper}=$({curl} -H 'content-type: application/json' -d '{body}' {base}/api/v1/session | jq -r .token)   # {status}"
        );
        tokens.push((*name, token));
    }
    let token = |who: &str| {
        tokens
            .iter()
            .find(|(n, _)| *n == who)
            .map(|(_, t)| t.clone())
    };
    let tries: [(&str, String, &str); 8] = [
        (
            "carol",
            format!("/api/v1/meters/{own}/readings?limit=3"),
            "her own meter's readings",
        ),
        (
            "carol",
            format!("/api/v1/meters/{other}/readings"),
            "another meter: not found, and a security event",
        ),
        (
            "carol",
            "/api/v1/security-events".to_owned(),
            "operators' data",
        ),
        (
            "otto",
            "/api/v1/security-events?limit=5".to_owned(),
            "the security events",
        ),
        (
            "otto",
            format!("/api/v1/meters/{other}"),
            "any meter, with its certificate",
        ),
        (
            "otto",
            "/api/v1/audit".to_owned(),
            "the audit log is the auditors'",
        ),
        (
            "alice",
            "/api/v1/audit?action=login.&limit=5".to_owned(),
            "the logins in the audit log",
        ),
        (
            "alice",
            format!("/api/v1/meters/{own}/readings"),
            "readings are personal data",
        ),
    ];
    for (who, path, why) in tries {
        let t = token(who).unwrap_or_default();
        let (status, _) = call(&client, &base, "GET", &path, Some(&t), None).await?;
        let upper = who.to_uppercase();
        println!(
            "   {curl} -H \"Authorization: Bearer ${upper}\" '{base}{path}'   # {status} {why}"
        );
    }
    println!("   (the demo made these calls itself; the head-end stops with it)");
    Ok(())
}
