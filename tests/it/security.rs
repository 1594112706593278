//! Authentication, authorization and tenancy, tried as an attacker would, against a real
//! three-node cluster: no key, a forged or revoked key, another tenant's ids, an agent that
//! claims to be a human or asks for a looser mode, a principal approving its own request.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use runtimeai_api::auth::{route_access, Access, Permission};
use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

async fn cluster() -> anyhow::Result<Cluster> {
    let options = ClusterOptions { extra_args: vec!["--simulated-step-ms".into(), "50".into()], ..Default::default() };
    Ok(Cluster::start(3, options).await?)
}

fn problem(response: &runtimeai_tests::Response, status: u16, kind: &str) -> bool {
    response.status == status
        && response.header("content-type") == Some("application/problem+json")
        && response.body["type"].as_str().is_some_and(|t| t.ends_with(kind))
}

/// Every operation of the served OpenAPI document, with its path parameters filled with ids
/// nobody has.
async fn served_operations(cluster: &Cluster) -> anyhow::Result<Vec<(Method, String, String)>> {
    let doc = cluster.get_eventually(1, "/v1/openapi.json").await?;
    anyhow::ensure!(doc.status == 200, "{doc:?}");
    let mut out = Vec::new();
    for (template, item) in doc.body["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = template
                .split('/')
                .map(|part| if part.starts_with('{') { "nosuch" } else { part })
                .collect::<Vec<_>>()
                .join("/");
            // A stream allowed to the caller would last as long as the connection.
            let concrete =
                if template.ends_with("/stream") { format!("{concrete}?timeout_seconds=1") } else { concrete };
            out.push((method.to_uppercase().parse()?, template.clone(), concrete));
        }
    }
    anyhow::ensure!(out.len() >= 40, "the document lists only {out:?}");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_the_unauthenticated_and_the_unpermitted() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let viewer = key_for(&cluster, 1, "vera", "human", &["*"], &["viewer"], None).await?;
    let before = cluster.cluster_view(2).await?["auth_failures"].as_u64().unwrap_or(0);
    let forged = format!("rai_admin_{}", "0".repeat(64));
    let operations = served_operations(&cluster).await?;
    for (method, template, path) in &operations {
        let access = route_access(method, template).expect("the table covers the document (unit test)");
        let body = (*method != Method::GET && *method != Method::DELETE).then(|| json!({}));
        for token in [None, Some(forged.as_str()), Some("not-a-key")] {
            let response = cluster.call_as(token, 2, method.clone(), path, body.as_ref(), &[]).await?;
            if access == Access::Public {
                assert_ne!(response.status, 401, "{method} {template} is a public probe: {response:?}");
                continue;
            }
            assert!(problem(&response, 401, "unauthenticated"), "{method} {template} with {token:?}: {response:?}");
            assert_eq!(response.header("www-authenticate"), Some("Bearer realm=\"runtimeai\""));
        }
        let as_viewer = cluster.call_as(Some(&viewer), 3, method.clone(), path, body.as_ref(), &[]).await?;
        match access {
            Access::Needs(Permission::Read) | Access::Authenticated | Access::Public => {
                assert!(![401, 403].contains(&as_viewer.status), "{method} {template}: {as_viewer:?}")
            }
            Access::Needs(_) => assert!(problem(&as_viewer, 403, "forbidden"), "{method} {template}: {as_viewer:?}"),
        }
    }
    let after = cluster.cluster_view(2).await?["auth_failures"].as_u64().unwrap_or(0);
    assert!(after >= before + 3 * (operations.len() as u64 - 2), "every refusal is counted: {before} → {after}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_and_cannot_choose_another() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let acme_ops = key_for(&cluster, 1, "acme-ops", "human", &["acme"], &["operator"], None).await?;
    let globex_ops = key_for(&cluster, 2, "globex-ops", "human", &["globex"], &["operator"], None).await?;
    let create = json!({"name": "db", "type": "vm"});
    let ours = cluster.call_eventually_as(&acme_ops, 1, Method::POST, "/v1/runtimes", Some(&create), &[]).await?;
    assert_eq!((ours.status, ours.body["tenant_id"].as_str()), (201, Some("acme")), "{ours:?}");
    let theirs = cluster.call_eventually_as(&globex_ops, 2, Method::POST, "/v1/runtimes", Some(&create), &[]).await?;
    assert_eq!((theirs.status, theirs.body["tenant_id"].as_str()), (201, Some("globex")), "{theirs:?}");
    let (ours_id, theirs_id) = (ours.body["id"].as_str().unwrap(), theirs.body["id"].as_str().unwrap());
    let their_op = theirs.body["active_operation"].as_str().unwrap();

    phase("another tenant's objects by id are not found, whatever is asked of them");
    for (method, path) in [
        (Method::GET, format!("/v1/runtimes/{theirs_id}")),
        (Method::GET, format!("/v1/runtimes/{theirs_id}/events")),
        (Method::GET, format!("/v1/runtimes/{theirs_id}/operations")),
        (Method::GET, format!("/v1/operations/{their_op}")),
        (Method::POST, format!("/v1/runtimes/{theirs_id}/lifecycle/restart")),
        (Method::DELETE, format!("/v1/runtimes/{theirs_id}")),
        (Method::POST, format!("/v1/operations/{their_op}/cancel")),
    ] {
        let response = cluster.call_eventually_as(&acme_ops, 3, method.clone(), &path, None, &[]).await?;
        assert!(problem(&response, 404, "not-found"), "{method} {path}: {response:?}");
    }
    let list = cluster.call_eventually_as(&acme_ops, 2, Method::GET, "/v1/runtimes", None, &[]).await?;
    let ids: Vec<&str> = list.body["items"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, [ours_id], "lists hold the principal's tenants only");

    phase("a tenant not granted is 403, in the header or in the body");
    let chosen =
        cluster.call_eventually_as(&acme_ops, 1, Method::GET, "/v1/runtimes", None, &[("tenant_id", "globex")]).await?;
    assert!(problem(&chosen, 403, "tenant-not-granted"), "{chosen:?}");
    let named = json!({"name": "sneaky", "type": "vm", "tenant_id": "globex"});
    let refused = cluster.call_eventually_as(&acme_ops, 1, Method::POST, "/v1/runtimes", Some(&named), &[]).await?;
    assert!(problem(&refused, 403, "tenant-not-granted"), "{refused:?}");

    phase("an idempotency key is the principal's own: another's reuse gets its own answer");
    let keyed = [("idempotency-key", "same-key")];
    let first = cluster
        .call_eventually_as(
            &acme_ops,
            1,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "k", "type": "vm"})),
            &keyed,
        )
        .await?;
    let other = cluster
        .call_eventually_as(
            &globex_ops,
            2,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "k", "type": "vm"})),
            &keyed,
        )
        .await?;
    assert_eq!((first.status, other.status), (201, 201), "{first:?} {other:?}");
    assert_ne!(first.body["id"], other.body["id"], "globex is not shown acme's reply");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_bound_by_their_keys_and_nobody_approves_their_own_request() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let reader = key_for(&cluster, 1, "reader-bot", "agent", &["*"], &["agent"], Some("read_only")).await?;
    let adviser = key_for(&cluster, 2, "adviser-bot", "agent", &["*"], &["agent"], None).await?;
    let actor = key_for(&cluster, 3, "actor-bot", "agent", &["*"], &["agent"], Some("act")).await?;
    let ops = key_for(&cluster, 1, "olga", "human", &["*"], &["operator", "approver"], None).await?;
    let refused = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/keys",
            Some(&json!({"name": "root-bot", "kind": "agent", "tenants": ["*"], "roles": ["cluster_admin"]})),
            &[],
        )
        .await?;
    assert!(problem(&refused, 400, "validation"), "an agent key cannot name admin roles: {refused:?}");
    let created = cluster
        .call_eventually_as(
            &ops,
            1,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "prod", "type": "vm", "labels": {"env": "production"}})),
            &[],
        )
        .await?;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), EVENTUALLY).await?;

    phase("read_only reads; suggest_only plans and dry-runs; neither changes anything");
    assert_eq!(
        cluster.call_eventually_as(&reader, 2, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?.status,
        200
    );
    let plan = json!({"goal": "reduce cost"});
    let path = format!("/v1/runtimes/{id}/actions/plan");
    let no_plan = cluster.call_eventually_as(&reader, 2, Method::POST, &path, Some(&plan), &[]).await?;
    assert!(problem(&no_plan, 403, "forbidden"), "{no_plan:?}");
    assert_eq!(cluster.call_eventually_as(&adviser, 2, Method::POST, &path, Some(&plan), &[]).await?.status, 200);
    let intent = format!("/v1/runtimes/{id}/intent");
    let dry = cluster
        .call_eventually_as(
            &adviser,
            3,
            Method::POST,
            &intent,
            Some(&json!({"goal": "reduce cost", "dry_run": true})),
            &[],
        )
        .await?;
    assert_eq!(dry.status, 202, "{dry:?}");
    let wet = cluster
        .call_eventually_as(&adviser, 3, Method::POST, &intent, Some(&json!({"goal": "reduce cost"})), &[])
        .await?;
    assert!(problem(&wet, 403, "forbidden"), "{wet:?}");
    let stop = format!("/v1/runtimes/{id}/lifecycle/stop");
    let no_stop = cluster.call_eventually_as(&adviser, 1, Method::POST, &stop, None, &[]).await?;
    assert!(problem(&no_stop, 403, "forbidden"), "{no_stop:?}");

    phase("act: a looser policy mode than safe_first is refused; policies, settings, members, keys are out of reach");
    let execute = format!("/v1/runtimes/{id}/actions/execute");
    let loose = json!({"policy_mode": "aggressive", "actions": [{"type": "stop"}]});
    let loosened = cluster.call_eventually_as(&actor, 1, Method::POST, &execute, Some(&loose), &[]).await?;
    assert!(problem(&loosened, 403, "policy-mode-not-granted"), "{loosened:?}");
    for (method, path, body) in [
        (Method::POST, "/v1/policies", Some(json!({"name": "open", "rules": [{"kind": "allow_action"}]}))),
        (Method::PUT, "/v1/cluster/settings", Some(json!({"event_retention_count": 1, "event_retention_days": 1}))),
        (Method::POST, "/v1/cluster/members", Some(json!({"id": 9, "grpc": "127.0.0.1:1"}))),
        (Method::DELETE, "/v1/cluster/members/1", None),
        (
            Method::POST,
            "/v1/keys",
            Some(json!({"name": "x", "kind": "human", "tenants": ["*"], "roles": ["cluster_admin"]})),
        ),
        (Method::GET, "/v1/audit", None),
    ] {
        let response = cluster.call_eventually_as(&actor, 2, method.clone(), path, body.as_ref(), &[]).await?;
        assert!(problem(&response, 403, "forbidden"), "{method} {path}: {response:?}");
    }

    phase("the agent's stop waits for a human; it cannot approve it, with or without X-Actor");
    let parked = cluster.call_eventually_as(&actor, 3, Method::POST, &stop, None, &[]).await?;
    assert_eq!((parked.status, parked.body["status"].as_str()), (202, Some("pending_approval")), "{parked:?}");
    assert_eq!(parked.body["requested_by"], "agent:actor-bot", "{parked:?}");
    let approve = format!("/v1/operations/{}/approve", parked.body["id"].as_str().unwrap());
    for headers in [&[][..], &[("x-actor", "human:olga")][..]] {
        let own = cluster.call_eventually_as(&actor, 1, Method::POST, &approve, None, headers).await?;
        assert!(problem(&own, 403, "forbidden"), "{own:?}");
    }

    phase("four eyes: a human approver cannot approve their own request either");
    let own_stop = cluster
        .call_eventually_as(&ops, 2, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/restart"), None, &[])
        .await?;
    assert_eq!(own_stop.status, 409, "busy with the agent's parked stop: {own_stop:?}");
    let approved = cluster.call_eventually_as(&ops, 2, Method::POST, &approve, None, &[]).await?;
    assert_eq!((approved.status, approved.body["approval"]["by"].as_str()), (200, Some("human:olga")), "{approved:?}");
    cluster.wait_operation(1, approved.body["id"].as_str().unwrap(), EVENTUALLY).await?;
    let policy = json!({"name": "ask", "rules": [{"kind": "require_approval", "selector": {"actions": ["start"]}}]});
    assert_eq!(cluster.call_eventually(1, Method::POST, "/v1/policies", Some(&policy), &[]).await?.status, 201);
    let start = cluster
        .call_eventually_as(&ops, 3, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/start"), None, &[])
        .await?;
    assert_eq!(start.body["status"], "pending_approval", "{start:?}");
    let self_approve = format!("/v1/operations/{}/approve", start.body["id"].as_str().unwrap());
    let own = cluster.call_eventually_as(&ops, 1, Method::POST, &self_approve, None, &[]).await?;
    assert!(problem(&own, 403, "self-approval"), "{own:?}");
    let admin_approved = cluster.call_eventually(2, Method::POST, &self_approve, None, &[]).await?;
    assert_eq!(admin_approved.status, 200, "the admin may: {admin_approved:?}");
    cluster.wait_operation(1, start.body["id"].as_str().unwrap(), EVENTUALLY).await?;

    phase("a relabel out of a policy's scope (its env) waits for a human; other labels do not");
    let scoped = json!({"name": "prod-only", "scope_env": "production", "rules": [{"kind": "require_approval", "selector": {"actions": ["delete"]}}]});
    assert_eq!(cluster.call_eventually(1, Method::POST, "/v1/policies", Some(&scoped), &[]).await?.status, 201);
    let runtime_path = format!("/v1/runtimes/{id}");
    let other = json!({"labels": {"team": "db"}});
    let labelled = cluster.call_eventually_as(&ops, 3, Method::PATCH, &runtime_path, Some(&other), &[]).await?;
    assert_eq!((labelled.status, labelled.body["labels"]["team"].as_str()), (200, Some("db")), "{labelled:?}");
    let escape = json!({"labels": {"env": "dev"}});
    let parked = cluster.call_eventually_as(&ops, 2, Method::PATCH, &runtime_path, Some(&escape), &[]).await?;
    assert_eq!((parked.status, parked.body["status"].as_str()), (202, Some("pending_approval")), "{parked:?}");
    assert_eq!(
        (parked.body["kind"].as_str(), parked.body["requested_by"].as_str()),
        (Some("relabel"), Some("human:olga"))
    );
    assert!(parked.body["decisions"].to_string().contains("prod-only"), "the decision names the policy: {parked:?}");
    let unchanged = cluster.call_eventually_as(&ops, 1, Method::GET, &runtime_path, None, &[]).await?;
    assert_eq!(unchanged.body["labels"]["env"], "production", "nothing changes before approval: {unchanged:?}");
    let approve = format!("/v1/operations/{}/approve", parked.body["id"].as_str().unwrap());
    let by_agent = cluster.call_eventually_as(&actor, 1, Method::POST, &approve, None, &[]).await?;
    assert!(problem(&by_agent, 403, "forbidden"), "{by_agent:?}");
    let by_self = cluster.call_eventually_as(&ops, 1, Method::POST, &approve, None, &[]).await?;
    assert!(problem(&by_self, 403, "self-approval"), "{by_self:?}");
    let by_admin = cluster.call_eventually(3, Method::POST, &approve, None, &[]).await?;
    assert_eq!((by_admin.status, by_admin.body["status"].as_str()), (200, Some("succeeded")), "{by_admin:?}");
    let moved = cluster.call_eventually_as(&ops, 2, Method::GET, &runtime_path, None, &[]).await?;
    assert_eq!(moved.body["labels"]["env"], "dev", "approved, the label changed: {moved:?}");
    assert!(moved.body["active_operation"].is_null(), "{moved:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_revoked_everywhere_at_once_rotated_and_audited() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let body = json!({"name": "ci", "kind": "service", "tenants": ["acme"], "roles": ["viewer"]});
    let made = cluster.call_eventually(1, Method::POST, "/v1/keys", Some(&body), &[]).await?;
    assert_eq!(made.status, 201, "{made:?}");
    let token = made.body["token"].as_str().unwrap().to_string();
    let key_id = made.body["key"]["id"].as_str().unwrap().to_string();
    let listed = cluster.call_eventually(2, Method::GET, "/v1/keys", None, &[]).await?;
    let text = listed.body.to_string();
    assert!(text.contains(&key_id) && !text.contains(&token[token.len() - 32..]), "no secret in a listing: {text}");
    for via in 1..=3 {
        let me = cluster.call_eventually_as(&token, via, Method::GET, "/v1/auth/whoami", None, &[]).await?;
        assert_eq!((me.status, me.body["actor"].as_str()), (200, Some("service:ci")), "node {via}: {me:?}");
    }

    phase("a revocation through node 1 holds on every node");
    let revoked = cluster.call_eventually(1, Method::DELETE, &format!("/v1/keys/{key_id}"), None, &[]).await?;
    assert_eq!(revoked.status, 200, "{revoked:?}");
    let started = Instant::now();
    for via in 1..=3 {
        loop {
            let me = cluster.call_as(Some(&token), via, Method::GET, "/v1/auth/whoami", None, &[]).await?;
            if me.status == 401 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "node {via} still takes a revoked key: {me:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("revoked key refused on every node {:?} after the revocation answered", started.elapsed());

    phase("a rotation: the new key works, the old one does not");
    let made = cluster.call_eventually(2, Method::POST, "/v1/keys", Some(&body), &[]).await?;
    let (old, old_id) =
        (made.body["token"].as_str().unwrap().to_string(), made.body["key"]["id"].as_str().unwrap().to_string());
    let rotated = cluster.call_eventually(3, Method::POST, &format!("/v1/keys/{old_id}/rotate"), None, &[]).await?;
    assert_eq!(rotated.status, 201, "{rotated:?}");
    let new = rotated.body["token"].as_str().unwrap();
    assert_eq!(cluster.call_eventually_as(new, 3, Method::GET, "/v1/auth/whoami", None, &[]).await?.status, 200);
    assert_eq!(cluster.call_as(Some(&old), 3, Method::GET, "/v1/auth/whoami", None, &[]).await?.status, 401);

    phase("key and policy changes are in the audit feed, which is no runtime's events");
    let policy = json!({"name": "audited", "rules": [{"kind": "require_approval", "selector": {"actions": ["stop"]}}]});
    assert_eq!(cluster.call_eventually(1, Method::POST, "/v1/policies", Some(&policy), &[]).await?.status, 201);
    let removed = cluster.call_eventually(1, Method::DELETE, "/v1/cluster/members/99", None, &[]).await?;
    assert!(removed.status >= 400, "no member 99: {removed:?}");
    let audit = cluster.call_eventually(2, Method::GET, "/v1/audit", None, &[]).await?;
    let kinds: Vec<&str> = audit.body["items"].as_array().unwrap().iter().filter_map(|e| e["type"].as_str()).collect();
    for kind in ["apikey.created", "apikey.revoked", "policy.created", "member.remove"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert!(
        audit.body["items"].as_array().unwrap().iter().all(|e| e["actor_name"] == "admin" || e["actor"] == "system"),
        "{audit:?}"
    );
    let hidden =
        cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{}/events", "cluster"), None, &[]).await?;
    assert!(problem(&hidden, 404, "not-found"), "{hidden:?}");
    Ok(())
}
