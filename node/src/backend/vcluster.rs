//! Virtual Kubernetes clusters on a host cluster, through the Kubernetes API (`kube`).
//!
//! A vcluster runtime is a namespace `rtai-<runtime id>` holding what a vcluster control plane
//! consists of, named after the runtime: a ServiceAccount, Role and RoleBinding (`vc-<name>`),
//! a Service, and a StatefulSet whose pod runs the vcluster image with a data volume from its
//! PVC template (`data-<name>-0`); vcluster publishes the virtual cluster's kubeconfig in the
//! Secret `vc-<name>`. Everything carries `app.kubernetes.io/managed-by: runtimeai` and the
//! runtime's id. Objects are written with server-side apply (field manager `runtimeai`), so a
//! repeated create converges.
//!
//! stop / start = pause / resume as vcluster does it: the StatefulSet scaled to 0 (its replica
//! count kept in an annotation) and back, the data volume kept. restart = a rollout (a pod
//! template annotation naming the operation). scale = the control plane's replicas and
//! resources. snapshot = a CSI `VolumeSnapshot` of the data volume; restore = the volume
//! re-created from it while the control plane is paused. status from the StatefulSet and its
//! pods' container states (a crash-looping control plane is failed). A create
//! succeeds once the control plane is ready (watched).
//!
//! The host cluster is the same for every node given the same kubeconfig: the backend is
//! shared, so another node can take an operation over.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, WatchEvent,
    WatchParams,
};
use kube::Client;
use runtimeai_model::Runtime;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{BackendError, CallContext, Observed, Resources, RuntimeBackend};

/// The vcluster control plane image.
pub const VCLUSTER_IMAGE: &str = "ghcr.io/loft-sh/vcluster-oss:0.26.0";
const MANAGER: &str = "runtimeai";
const PAUSED_REPLICAS: &str = "runtimeai.dev/paused-replicas";

#[derive(Clone)]
pub struct VclusterBackend {
    client: Client,
    /// How long a create waits for the control plane to be ready.
    ready_timeout: Duration,
}

impl std::fmt::Debug for VclusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VclusterBackend").finish_non_exhaustive()
    }
}

fn classify(error: kube::Error) -> BackendError {
    match &error {
        kube::Error::Api(status) if status.code >= 500 || status.code == 429 || status.code == 409 => {
            BackendError::Retryable(format!("kubernetes: {status}"))
        }
        kube::Error::Api(status) if status.code == 404 => {
            BackendError::Permanent(format!("kubernetes: {status} (removed outside RuntimeAI?)"))
        }
        kube::Error::Api(status) => BackendError::Permanent(format!("kubernetes: {status}")),
        _ => BackendError::Retryable(format!("kubernetes: {error}")),
    }
}

fn not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// The namespace of a runtime's virtual cluster (Kubernetes names take no `_`).
pub fn namespace(runtime: &Runtime) -> String {
    format!("rtai-{}", runtime.id.replace('_', "-"))
}

fn labels(runtime: &Runtime) -> Value {
    json!({
        "app.kubernetes.io/managed-by": MANAGER,
        "app.kubernetes.io/name": "vcluster",
        "app.kubernetes.io/instance": runtime.name,
        "runtimeai.dev/runtime-id": runtime.id,
    })
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, BackendError> {
    serde_json::from_value(value).map_err(|e| BackendError::Permanent(format!("building an object: {e}")))
}

fn cpu_quantity(cpu: f64) -> String {
    format!("{}m", (cpu * 1000.0).round() as u64)
}

fn memory_quantity(bytes: u64) -> String {
    format!("{}Mi", (bytes >> 20).max(64))
}

/// The StatefulSet of a runtime's control plane (its desired state, for server-side apply).
pub fn statefulset(runtime: &Runtime, resources: &Resources) -> Value {
    let name = &runtime.name;
    let requests = json!({"cpu": cpu_quantity(resources.cpu), "memory": memory_quantity(resources.memory_bytes)});
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace(runtime), "labels": labels(runtime)},
        "spec": {
            "replicas": resources.replicas.max(1),
            "serviceName": name,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "vcluster", "app.kubernetes.io/instance": name}},
            "template": {
                "metadata": {"labels": labels(runtime)},
                "spec": {
                    "serviceAccountName": format!("vc-{name}"),
                    "containers": [{
                        "name": "syncer",
                        "image": VCLUSTER_IMAGE,
                        "ports": [{"name": "https", "containerPort": 8443}],
                        "resources": {"requests": requests, "limits": requests},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                    }]
                }
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels(runtime)},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}
            }]
        }
    })
}

/// The VolumeSnapshot API (a CSI extension, not in k8s-openapi).
fn volume_snapshots() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"))
}

/// Kubernetes names: lowercase letters, digits and '-'.
fn k8s_name(text: &str) -> String {
    text.to_ascii_lowercase().replace(['_', '.'], "-")
}

impl VclusterBackend {
    /// Rolls the control plane's pods over, as `kubectl rollout restart` does: a changed
    /// annotation on the pod template. It names the operation, so a retried call asks for the
    /// same rollout.
    async fn rollout(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"runtimeai.dev/restarted-by": cx.operation_id}}}}});
        self.api::<StatefulSet>(runtime)
            .patch(&runtime.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(classify)?;
        Ok("control plane rolled out again".into())
    }

    pub fn new(client: Client) -> VclusterBackend {
        VclusterBackend { client, ready_timeout: Duration::from_secs(300) }
    }

    /// Watches the control plane's StatefulSet until all its replicas are ready. A stream that
    /// ends (the API server closes watches) is watched again until the timeout; past it the
    /// error is retryable (a retried create re-applies, then waits again).
    async fn wait_ready(&self, runtime: &Runtime) -> Result<i32, BackendError> {
        let api = self.api::<StatefulSet>(runtime);
        let selector = format!("metadata.name={}", runtime.name);
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        let ready = |set: &StatefulSet| {
            let wanted = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = set.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
            (ready >= wanted).then_some(ready)
        };
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs().clamp(1, 290) as u32;
            let params = WatchParams::default().fields(&selector).timeout(left);
            let mut events = api.watch(&params, "0").await.map_err(classify)?.boxed();
            while let Some(event) = events.try_next().await.map_err(classify)? {
                match event {
                    WatchEvent::Added(set) | WatchEvent::Modified(set) => {
                        if let Some(count) = ready(&set) {
                            return Ok(count);
                        }
                    }
                    WatchEvent::Deleted(_) => {
                        return Err(BackendError::Permanent(format!(
                            "StatefulSet {} was deleted while starting",
                            runtime.name
                        )))
                    }
                    WatchEvent::Error(status) => return Err(classify(kube::Error::Api(status))),
                    WatchEvent::Bookmark(_) => {}
                }
            }
        }
        Err(BackendError::Retryable(format!(
            "the vcluster control plane was not ready within {}s",
            self.ready_timeout.as_secs()
        )))
    }

    /// A client for the host cluster of `kubeconfig`.
    pub async fn from_kubeconfig(path: &std::path::Path) -> Result<VclusterBackend, BackendError> {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| BackendError::Permanent(format!("cannot read kubeconfig {}: {e}", path.display())))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| BackendError::Permanent(format!("kubeconfig {}: {e}", path.display())))?;
        let client =
            Client::try_from(config).map_err(|e| BackendError::Permanent(format!("kubernetes client: {e}")))?;
        Ok(VclusterBackend::new(client))
    }

    fn api<K>(&self, runtime: &Runtime) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &namespace(runtime))
    }

    async fn apply<K>(&self, api: &Api<K>, name: &str, object: Value) -> Result<(), BackendError>
    where
        K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
    {
        let object: K = typed(object)?;
        api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object)).await.map_err(classify)?;
        Ok(())
    }

    async fn set_replicas(&self, runtime: &Runtime, replicas: i32, paused: Option<i32>) -> Result<(), BackendError> {
        let annotation = paused.map(|r| Value::String(r.to_string())).unwrap_or(Value::Null);
        let patch = json!({
            "metadata": {"annotations": {PAUSED_REPLICAS: annotation}},
            "spec": {"replicas": replicas}
        });
        self.api::<StatefulSet>(runtime)
            .patch(&runtime.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn statefulset(&self, runtime: &Runtime) -> Result<Option<StatefulSet>, BackendError> {
        self.api::<StatefulSet>(runtime).get_opt(&runtime.name).await.map_err(classify)
    }

    /// Pauses the control plane (replicas → 0, the count kept in an annotation).
    async fn pause(&self, runtime: &Runtime) -> Result<String, BackendError> {
        let Some(set) = self.statefulset(runtime).await? else {
            return Err(BackendError::Permanent(format!("no StatefulSet {} in {}", runtime.name, namespace(runtime))));
        };
        let replicas = set.spec.and_then(|s| s.replicas).unwrap_or(1);
        if replicas == 0 {
            return Ok("already paused".into());
        }
        self.set_replicas(runtime, 0, Some(replicas)).await?;
        Ok(format!("control plane paused ({replicas} replica(s) kept for resume); data volume kept"))
    }

    /// The virtual cluster's kubeconfig, as vcluster published it.
    pub async fn kubeconfig(&self, runtime: &Runtime) -> Result<Option<String>, BackendError> {
        let secret = self.api::<Secret>(runtime).get_opt(&format!("vc-{}", runtime.name)).await.map_err(classify)?;
        let config = secret.and_then(|s| s.data).and_then(|mut d| d.remove("config"));
        Ok(config.map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned()))
    }
}

#[async_trait::async_trait]
impl runtimeai_api::KubeconfigSource for VclusterBackend {
    async fn kubeconfig(&self, runtime: &Runtime) -> Result<Option<String>, String> {
        VclusterBackend::kubeconfig(self, runtime).await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl RuntimeBackend for VclusterBackend {
    fn driver(&self) -> &'static str {
        "kubernetes"
    }

    fn shared(&self) -> bool {
        true
    }

    fn capabilities(&self) -> &'static [runtimeai_model::ActionKind] {
        super::VCLUSTER
    }

    async fn create(&self, _: &CallContext, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        let ns = namespace(runtime);
        let name = runtime.name.clone();
        let sa = format!("vc-{name}");
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let metadata = |object_name: &str| json!({"name": object_name, "namespace": ns, "labels": labels(runtime)});
        self.apply(
            &namespaces,
            &ns,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels(runtime)}}),
        )
        .await?;
        let object = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(&sa)});
        self.apply(&self.api::<ServiceAccount>(runtime), &sa, object).await?;
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata(&sa),
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps", "secrets", "services", "pods", "pods/attach", "pods/portforward", "pods/exec", "persistentvolumeclaims", "endpoints", "events"], "verbs": ["create", "delete", "patch", "update", "get", "list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["statefulsets", "replicasets", "deployments"], "verbs": ["get", "list", "watch"]}
            ]
        });
        self.apply(&self.api::<Role>(runtime), &sa, role).await?;
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata(&sa),
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa}
        });
        self.apply(&self.api::<RoleBinding>(runtime), &sa, binding).await?;
        let service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": metadata(&name),
            "spec": {
                "type": "ClusterIP",
                "ports": [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}],
                "selector": {"app.kubernetes.io/name": "vcluster", "app.kubernetes.io/instance": name}
            }
        });
        self.apply(&self.api::<Service>(runtime), &name, service).await?;
        self.apply(&self.api::<StatefulSet>(runtime), &name, statefulset(runtime, resources)).await?;
        let ready = self.wait_ready(runtime).await?;
        Ok(format!("vcluster {name} in namespace {ns}: control plane ready ({ready} replica(s))"))
    }

    async fn delete(&self, _: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let ns = namespace(runtime);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match namespaces.delete(&ns, &DeleteParams::foreground()).await {
            Ok(_) => Ok(format!("namespace {ns} deleted with everything in it")),
            Err(e) if not_found(&e) => Ok(format!("namespace {ns} already gone")),
            Err(e) => Err(classify(e)),
        }
    }

    async fn start(&self, _: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let Some(set) = self.statefulset(runtime).await? else {
            return Err(BackendError::Permanent(format!("no StatefulSet {} in {}", runtime.name, namespace(runtime))));
        };
        let paused =
            set.metadata.annotations.as_ref().and_then(|a| a.get(PAUSED_REPLICAS)).and_then(|r| r.parse().ok());
        let current = set.spec.and_then(|s| s.replicas).unwrap_or(0);
        if current > 0 && paused.is_none() {
            return Ok("already running".into());
        }
        let replicas = paused.unwrap_or(1);
        self.set_replicas(runtime, replicas, None).await?;
        Ok(format!("control plane resumed with {replicas} replica(s)"))
    }

    async fn stop(&self, _: &CallContext, runtime: &Runtime, _: bool, _: Duration) -> Result<String, BackendError> {
        self.pause(runtime).await
    }

    /// A vcluster's restart is a rollout: its pods replaced one at a time, as the StatefulSet's
    /// update strategy says.
    async fn restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.rollout(cx, runtime).await
    }

    async fn rollout_restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.rollout(cx, runtime).await
    }

    async fn scale(&self, _: &CallContext, runtime: &Runtime, target: &Resources) -> Result<String, BackendError> {
        self.apply(&self.api::<StatefulSet>(runtime), &runtime.name, statefulset(runtime, target)).await?;
        Ok(format!(
            "control plane: {} replica(s), {} cpu, {} memory each",
            target.replicas.max(1),
            cpu_quantity(target.cpu),
            memory_quantity(target.memory_bytes)
        ))
    }

    async fn snapshot(
        &self,
        _: &CallContext,
        runtime: &Runtime,
        snapshot_id: &str,
        name: &str,
    ) -> Result<String, BackendError> {
        let resource = volume_snapshots();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace(runtime), &resource);
        let snapshot_name = k8s_name(snapshot_id);
        let object = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": snapshot_name, "namespace": namespace(runtime), "labels": labels(runtime), "annotations": {"runtimeai.dev/snapshot-name": name}},
            "spec": {"source": {"persistentVolumeClaimName": format!("data-{}-0", runtime.name)}}
        });
        let object: DynamicObject = typed(object)?;
        api.patch(&snapshot_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object))
            .await
            .map_err(classify)?;
        Ok(format!("VolumeSnapshot {snapshot_name} of the data volume"))
    }

    async fn restore(&self, _: &CallContext, runtime: &Runtime, snapshot_id: &str) -> Result<String, BackendError> {
        let snapshot_name = k8s_name(snapshot_id);
        let pvc_name = format!("data-{}-0", runtime.name);
        let resource = volume_snapshots();
        let snapshots: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace(runtime), &resource);
        if snapshots.get_opt(&snapshot_name).await.map_err(classify)?.is_none() {
            return Err(BackendError::Permanent(format!("no VolumeSnapshot {snapshot_name}")));
        }
        let set = self.statefulset(runtime).await?;
        let replicas = set.and_then(|s| s.spec).and_then(|s| s.replicas).unwrap_or(1).max(1);
        self.pause(runtime).await?;
        let pvcs = self.api::<PersistentVolumeClaim>(runtime);
        match pvcs.delete(&pvc_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(classify(e)),
        }
        let pvc = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": pvc_name, "namespace": namespace(runtime), "labels": labels(runtime)},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "5Gi"}},
                "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot_name}
            }
        });
        self.apply(&pvcs, &pvc_name, pvc).await?;
        self.set_replicas(runtime, replicas, None).await?;
        Ok(format!("data volume re-created from {snapshot_name}; control plane resumed"))
    }

    async fn list_snapshots(&self, runtime: &Runtime) -> Result<Vec<String>, BackendError> {
        let resource = volume_snapshots();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace(runtime), &resource);
        let selector = format!("runtimeai.dev/runtime-id={}", runtime.id);
        let list = api.list(&ListParams::default().labels(&selector)).await.map_err(classify)?;
        Ok(list.items.into_iter().filter_map(|o| o.metadata.name).collect())
    }

    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError> {
        let Some(set) = self.statefulset(runtime).await? else { return Ok(Observed::Missing) };
        let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        if replicas == 0 {
            return Ok(Observed::Stopped);
        }
        let ready = set.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
        // A pod that cannot run says why in its container statuses.
        let selector = format!("app.kubernetes.io/instance={}", runtime.name);
        let pods = self.api::<Pod>(runtime).list(&ListParams::default().labels(&selector)).await.map_err(classify)?;
        for pod in &pods.items {
            let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
            for status in statuses {
                let waiting = status.state.and_then(|s| s.waiting).and_then(|w| w.reason);
                if let Some(
                    reason @ ("CrashLoopBackOff" | "ImagePullBackOff" | "ErrImagePull" | "CreateContainerConfigError"),
                ) = waiting.as_deref()
                {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    return Ok(Observed::Failed(format!("pod {name}: {reason}")));
                }
            }
        }
        let resources = set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.requests.clone())
            .unwrap_or_default();
        let memory =
            resources.get("memory").and_then(|q| runtimeai_engine::catalogue::quantity_bytes(&q.0)).unwrap_or(0);
        // Requests are the allocation, not a measurement of use (that needs metrics-server).
        Ok(Observed::Running {
            cpu: None,
            disk_bytes: None,
            memory_bytes: memory * ready.max(1) as u64,
            latency_ms: None,
        })
    }
}

/// Against kube's standard test double (a tower-test mock service), since no Kubernetes API
/// server can run here: every request is checked (method, path, query, body against the
/// objects a real vcluster needs) and answered the way an API server answers, 404 and 409
/// included. This is the API contract, not a live cluster.
#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use runtimeai_model::RuntimeType;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// One expected request and the answer to it.
    struct Exchange {
        method: Method,
        path: String,
        /// Must appear in the query string.
        query: &'static str,
        /// Checks the request body (JSON).
        check: Box<dyn Fn(&Value) + Send>,
        status: u16,
        answer: Value,
        /// The answer is a watch stream: one JSON event per line (`answer` holds the events).
        body_stream: bool,
    }

    fn exchange(method: Method, path: impl Into<String>, query: &'static str, status: u16, answer: Value) -> Exchange {
        Exchange { method, path: path.into(), query, check: Box::new(|_| {}), status, answer, body_stream: false }
    }

    fn checked(mut exchange: Exchange, check: impl Fn(&Value) + Send + 'static) -> Exchange {
        exchange.check = Box::new(check);
        exchange
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": reason})
    }

    /// Serves `script` in order, then fails on any further request.
    async fn api_server(mut handle: Handle, script: Vec<Exchange>) {
        for (i, expected) in script.into_iter().enumerate() {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| panic!("request {i} never came"));
            assert_eq!(request.method(), expected.method, "request {i}: {}", request.uri());
            assert_eq!(request.uri().path(), expected.path, "request {i}");
            let query = request.uri().query().unwrap_or_default().to_string();
            assert!(query.contains(expected.query), "request {i} query {query:?} lacks {:?}", expected.query);
            let apply = query.contains("fieldManager=runtimeai");
            assert!(!apply || query.contains("force=true"), "request {i}: apply takes ownership of our fields");
            let content_type =
                request.headers().get("content-type").map(|v| v.to_str().unwrap_or_default().to_string());
            let bytes = request.into_body().collect_bytes().await.unwrap();
            if !bytes.is_empty() {
                if apply {
                    assert_eq!(
                        content_type.as_deref(),
                        Some("application/apply-patch+yaml"),
                        "request {i}: server-side apply"
                    );
                }
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                (expected.check)(&body);
            }
            let answer = match (&expected.answer, expected.body_stream) {
                (Value::Array(events), true) => {
                    events.iter().map(|e| e.to_string() + "\n").collect::<String>().into_bytes()
                }
                (answer, _) => serde_json::to_vec(answer).unwrap(),
            };
            send.send_response(Response::builder().status(expected.status).body(Body::from(answer)).unwrap());
        }
    }

    fn backend(script: Vec<Exchange>) -> (VclusterBackend, tokio::task::JoinHandle<()>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(api_server(handle, script));
        (VclusterBackend::new(Client::new(service, "default")), server)
    }

    fn runtime() -> Runtime {
        let mut runtime = Runtime::new("rt_01abc", "team-a", RuntimeType::Vcluster, chrono::DateTime::UNIX_EPOCH);
        runtime.spec.size = Some("medium".into());
        runtime
    }

    fn cx() -> CallContext {
        CallContext { operation_id: "op_1".into(), step: 0, token: 1 }
    }

    /// The object the API server stores: what was applied, with server fields.
    fn stored(mut object: Value) -> Value {
        object["metadata"]["uid"] = json!("0b9f7e3c-5b4e-4c4e-9d1e-000000000001");
        object["metadata"]["resourceVersion"] = json!("1042");
        object
    }

    const NS: &str = "rtai-rt-01abc";

    #[tokio::test]
    async fn create_applies_the_objects_of_a_vcluster_control_plane() {
        let rt = runtime();
        let resources = Resources { cpu: 2.0, memory_bytes: 4 << 30, replicas: 1 };
        let set = statefulset(&rt, &resources);
        let mut starting = stored(set.clone());
        starting["status"] = json!({"replicas": 1, "readyReplicas": 0});
        let mut ready = starting.clone();
        ready["status"]["readyReplicas"] = json!(1);
        let ours = |body: &Value| {
            assert_eq!(body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "runtimeai", "{body}");
            assert_eq!(body["metadata"]["labels"]["runtimeai.dev/runtime-id"], "rt_01abc", "{body}");
        };
        let apply = "fieldManager=runtimeai";
        let script = vec![
            checked(
                exchange(
                    Method::PATCH,
                    format!("/api/v1/namespaces/{NS}"),
                    apply,
                    201,
                    stored(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})),
                ),
                move |b| {
                    ours(b);
                    assert_eq!(b["kind"], "Namespace");
                },
            ),
            checked(
                exchange(
                    Method::PATCH,
                    format!("/api/v1/namespaces/{NS}/serviceaccounts/vc-team-a"),
                    apply,
                    201,
                    stored(
                        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "vc-team-a", "namespace": NS}}),
                    ),
                ),
                move |b| ours(b),
            ),
            checked(
                exchange(
                    Method::PATCH,
                    format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/vc-team-a"),
                    apply,
                    201,
                    stored(
                        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "vc-team-a", "namespace": NS}}),
                    ),
                ),
                move |b| {
                    ours(b);
                    let resources = &b["rules"][0]["resources"];
                    assert!(resources.as_array().unwrap().iter().any(|r| r == "pods"), "{b}");
                },
            ),
            checked(
                exchange(
                    Method::PATCH,
                    format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/vc-team-a"),
                    apply,
                    201,
                    stored(
                        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "vc-team-a", "namespace": NS}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vc-team-a"}}),
                    ),
                ),
                move |b| {
                    assert_eq!(
                        b["subjects"][0],
                        json!({"kind": "ServiceAccount", "name": "vc-team-a", "namespace": NS})
                    );
                    assert_eq!(b["roleRef"]["name"], "vc-team-a");
                },
            ),
            checked(
                exchange(
                    Method::PATCH,
                    format!("/api/v1/namespaces/{NS}/services/team-a"),
                    apply,
                    201,
                    stored(
                        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "team-a", "namespace": NS}}),
                    ),
                ),
                move |b| {
                    assert_eq!(b["spec"]["ports"][0]["port"], 443);
                    assert_eq!(b["spec"]["ports"][0]["targetPort"], 8443);
                },
            ),
            checked(
                exchange(
                    Method::PATCH,
                    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/team-a"),
                    apply,
                    201,
                    stored(set),
                ),
                move |b| {
                    ours(b);
                    assert_eq!(b["spec"]["replicas"], 1);
                    let container = &b["spec"]["template"]["spec"]["containers"][0];
                    assert_eq!(container["image"], VCLUSTER_IMAGE);
                    assert_eq!(container["resources"]["limits"], json!({"cpu": "2000m", "memory": "4096Mi"}));
                    assert_eq!(b["spec"]["template"]["spec"]["serviceAccountName"], "vc-team-a");
                    assert_eq!(b["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
                },
            ),
            // The control plane comes up: a watch stream of the StatefulSet, not ready, then ready.
            Exchange {
                body_stream: true,
                ..exchange(
                    Method::GET,
                    format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
                    "watch=true",
                    200,
                    Value::Array(vec![
                        json!({"type": "ADDED", "object": starting}),
                        json!({"type": "MODIFIED", "object": ready}),
                    ]),
                )
            },
        ];
        let (backend, server) = backend(script);
        let message = backend.create(&cx(), &rt, &resources).await.unwrap();
        assert!(message.contains(NS) && message.contains("ready (1 replica"), "{message}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_rollout_restart_changes_the_pod_template_as_kubectl_does() {
        let rt = runtime();
        let path = format!("/apis/apps/v1/namespaces/{NS}/statefulsets/team-a");
        let running = stored(statefulset(&rt, &Resources { cpu: 1.0, memory_bytes: 2 << 30, replicas: 2 }));
        let rolled = |b: &serde_json::Value| {
            let annotations = &b["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(annotations["runtimeai.dev/restarted-by"], "op_1", "names the operation: {b}");
            assert!(b["spec"]["replicas"].is_null(), "a merge patch of the template only: {b}");
        };
        let script = vec![
            checked(exchange(Method::PATCH, &path, "", 200, running.clone()), rolled),
            checked(exchange(Method::PATCH, &path, "", 200, running), rolled),
        ];
        let (backend, server) = backend(script);
        assert!(backend.capabilities().contains(&runtimeai_model::ActionKind::RolloutRestart));
        let message = backend.rollout_restart(&cx(), &rt).await.unwrap();
        assert!(message.contains("rolled out"), "{message}");
        backend.rollout_restart(&cx(), &rt).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn stop_and_start_pause_and_resume_the_control_plane() {
        let rt = runtime();
        let path = format!("/apis/apps/v1/namespaces/{NS}/statefulsets/team-a");
        let running = stored(statefulset(&rt, &Resources { cpu: 1.0, memory_bytes: 2 << 30, replicas: 2 }));
        let mut paused = running.clone();
        paused["spec"]["replicas"] = json!(0);
        paused["metadata"]["annotations"] = json!({PAUSED_REPLICAS: "2"});
        let script = vec![
            exchange(Method::GET, &path, "", 200, running.clone()),
            checked(exchange(Method::PATCH, &path, "", 200, paused.clone()), |b| {
                assert_eq!(b["spec"]["replicas"], 0);
                assert_eq!(b["metadata"]["annotations"][PAUSED_REPLICAS], "2");
            }),
            exchange(Method::GET, &path, "", 200, paused.clone()),
            exchange(Method::GET, &path, "", 200, paused),
            checked(exchange(Method::PATCH, &path, "", 200, running.clone()), |b| {
                assert_eq!(b["spec"]["replicas"], 2, "resumed with the kept count");
                assert!(b["metadata"]["annotations"][PAUSED_REPLICAS].is_null(), "the annotation is removed");
            }),
            exchange(Method::GET, &path, "", 200, running.clone()),
            exchange(
                Method::GET,
                format!("/api/v1/namespaces/{NS}/pods"),
                "labelSelector=app.kubernetes.io%2Finstance%3Dteam-a",
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    {"metadata": {"name": "team-a-0"}, "status": {"containerStatuses": [{"name": "syncer", "ready": true, "restartCount": 0, "image": VCLUSTER_IMAGE, "imageID": "", "state": {"running": {}}}]}}
                ]}),
            ),
            exchange(Method::GET, &path, "", 200, running),
            exchange(
                Method::GET,
                format!("/api/v1/namespaces/{NS}/pods"),
                "",
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    {"metadata": {"name": "team-a-0"}, "status": {"containerStatuses": [{"name": "syncer", "ready": false, "restartCount": 7, "image": VCLUSTER_IMAGE, "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}
                ]}),
            ),
        ];
        let (backend, server) = backend(script);
        backend.stop(&cx(), &rt, false, Duration::from_secs(1)).await.unwrap();
        assert_eq!(backend.status(&rt).await.unwrap(), Observed::Stopped);
        let message = backend.start(&cx(), &rt).await.unwrap();
        assert!(message.contains("2 replica"), "{message}");
        assert!(matches!(backend.status(&rt).await.unwrap(), Observed::Running { .. }));
        let crashing = backend.status(&rt).await.unwrap();
        assert_eq!(crashing, Observed::Failed("pod team-a-0: CrashLoopBackOff".into()), "pod conditions count");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn errors_are_classified_and_gone_is_converged() {
        let rt = runtime();
        let set = format!("/apis/apps/v1/namespaces/{NS}/statefulsets/team-a");
        let script = vec![
            exchange(Method::GET, &set, "", 404, status(404, "NotFound")),
            exchange(Method::DELETE, format!("/api/v1/namespaces/{NS}"), "", 404, status(404, "NotFound")),
            exchange(Method::PATCH, &set, "", 409, status(409, "Conflict")),
            exchange(Method::PATCH, &set, "", 403, status(403, "Forbidden")),
            exchange(
                Method::GET,
                format!("/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots/snap-1"),
                "",
                404,
                status(404, "NotFound"),
            ),
        ];
        let (backend, server) = backend(script);
        assert_eq!(backend.status(&rt).await.unwrap(), Observed::Missing, "no StatefulSet: missing (drift)");
        let gone = backend.delete(&cx(), &rt).await.unwrap();
        assert!(gone.contains("already gone"), "deleting twice converges: {gone}");
        assert!(matches!(backend.restart(&cx(), &rt).await, Err(BackendError::Retryable(_))), "409 is retried");
        assert!(matches!(backend.restart(&cx(), &rt).await, Err(BackendError::Permanent(_))), "403 is not");
        let missing = backend.restore(&cx(), &rt, "snap_1").await.unwrap_err();
        assert!(missing.to_string().contains("no VolumeSnapshot snap-1"), "{missing}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_kubeconfig_is_the_one_vcluster_published() {
        let rt = runtime();
        let path = format!("/api/v1/namespaces/{NS}/secrets/vc-team-a");
        // "apiVersion: v1\nkind: Config\n", base64 as the API server sends Secret data.
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vc-team-a", "namespace": NS},
            "data": {"config": "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmlnCg=="}});
        let script = vec![
            exchange(Method::GET, &path, "", 200, secret),
            exchange(Method::GET, &path, "", 404, status(404, "NotFound")),
        ];
        let (backend, server) = backend(script);
        assert_eq!(backend.kubeconfig(&rt).await.unwrap().as_deref(), Some("apiVersion: v1\nkind: Config\n"));
        assert_eq!(backend.kubeconfig(&rt).await.unwrap(), None, "not published yet");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn snapshots_are_volume_snapshots_of_the_data_volume() {
        let rt = runtime();
        let path = format!("/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots/snap-1");
        let answer = stored(
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "snap-1", "namespace": NS}}),
        );
        let script = vec![checked(exchange(Method::PATCH, &path, "fieldManager=runtimeai", 201, answer), |b| {
            assert_eq!(b["spec"]["source"]["persistentVolumeClaimName"], "data-team-a-0");
            assert_eq!(b["metadata"]["annotations"]["runtimeai.dev/snapshot-name"], "nightly");
        })];
        let (backend, server) = backend(script);
        backend.snapshot(&cx(), &rt, "snap_1", "nightly").await.unwrap();
        server.await.unwrap();
    }
}
