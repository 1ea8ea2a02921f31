//! Connections to the member clusters named by each `DataCenter`'s kubeconfig
//! Secret, and what the operator reads from them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use serde::de::DeserializeOwned;

use super::Error;
use super::children::{self, Child};
use crate::crd::{Capacity, ComputeWorkload, DataCenter};
use crate::quantity;

pub use crate::crd::{GPU_MODEL_LABEL, GPU_RESOURCE};

/// One client per data center, rebuilt when its Secret changes, and a watch
/// on the operator's copies in each member that reports which workload to
/// look at again (readiness comes back as soon as the member reports it).
pub struct Members {
    clients: Mutex<HashMap<String, Member>>,
    timeout: Duration,
    /// How long a member's client is used without reading its kubeconfig
    /// Secret again, while probes succeed: reading it on every heartbeat
    /// costs the control API server a request per data center per
    /// heartbeat. A failed probe reads it again at once (see
    /// [`Members::read_secret_again`]).
    secret_reread: Duration,
    changes: UnboundedSender<ObjectRef<ComputeWorkload>>,
    copies: Arc<Mutex<HashMap<CopyKey, CopyState>>>,
    /// Which copies each member's watches have seen, by kind: looking for a
    /// workload's copies reads this instead of listing three kinds in every
    /// member.
    present: Arc<Mutex<HashMap<(String, &'static str), Present>>>,
    namespaces: Mutex<HashSet<(String, String)>>,
    /// How many times each data center's client was dropped (its access
    /// taken away, or the data center deleted). A connect that began before
    /// a drop must not put back the client it made from what it read then.
    /// Locked after `clients`.
    dropped: Mutex<HashMap<String, u64>>,
}

/// The copies of one kind a member's watch has seen.
#[derive(Debug, Default)]
struct Present {
    /// The watch has listed everything since it last (re)started.
    synced: bool,
    /// (copy namespace, copy name).
    copies: HashSet<(String, String)>,
}

/// The kinds of copy the operator makes.
pub const KINDS: [&str; 3] = ["Deployment", "StatefulSet", "Job"];

/// (data center, workload namespace, workload name).
type CopyKey = (String, String, String);

/// What the operator last applied as a copy, and what the member reports of
/// it, kept from the member watch: a reconcile that changes nothing sends
/// nothing to the member.
#[derive(Debug, Default)]
struct CopyState {
    /// Fingerprint of the applied object and the generation it got.
    applied: Option<(u64, Option<i64>)>,
    /// The kind last applied, kept when the member's watch resets `applied`:
    /// a change of `spec.kind` must remove the copy of the old kind.
    kind: Option<&'static str>,
    ready: i32,
}

struct Member {
    version: String,
    /// The Secret the client was made from, and when it was last read.
    secret: (String, String, String),
    read_at: Option<std::time::Instant>,
    client: Client,
    /// The member cluster's identity, once read.
    cluster_id: Option<String>,
    watches: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

impl Members {
    /// `timeout` bounds connecting to and each request against a member, so
    /// an unreachable data center is noticed quickly.
    /// `changes` receives the workload of every copy that changes in a
    /// member.
    /// `secret_reread` is how long a client is used before its Secret is
    /// read again.
    pub fn new(
        timeout: Duration,
        secret_reread: Duration,
        changes: UnboundedSender<ObjectRef<ComputeWorkload>>,
    ) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            timeout,
            secret_reread,
            changes,
            copies: Arc::default(),
            present: Arc::default(),
            namespaces: Mutex::default(),
            dropped: Mutex::default(),
        }
    }

    /// The ready replicas of a copy the member reported, if its last applied
    /// fingerprint is `fingerprint` (nothing to apply).
    pub fn unchanged(&self, key: &CopyKey, fingerprint: u64) -> Option<i32> {
        let copies = lock(&self.copies);
        let state = copies.get(key)?;
        (state.applied?.0 == fingerprint).then_some(state.ready)
    }

    /// Records an applied copy as the member returned it.
    pub fn applied(
        &self,
        key: CopyKey,
        kind: &'static str,
        fingerprint: u64,
        generation: Option<i64>,
        ready: i32,
    ) {
        let mut copies = lock(&self.copies);
        let state = copies.entry(key).or_default();
        state.applied = Some((fingerprint, generation));
        state.kind = Some(kind);
        state.ready = ready;
    }

    /// The ready replicas of a copy the member's watch has seen, if any.
    pub fn ready_of(&self, key: &CopyKey) -> Option<i32> {
        lock(&self.copies).get(key).map(|state| state.ready)
    }

    /// The kind this process last applied for a copy, if it applied one.
    pub fn applied_kind(&self, key: &CopyKey) -> Option<&'static str> {
        lock(&self.copies).get(key)?.kind
    }

    /// Forgets a copy (deleted, or its apply failed).
    pub fn forget_copy(&self, key: &CopyKey) {
        lock(&self.copies).remove(key);
    }

    /// The kinds of copy of workload `namespace/name` in `dc`'s member, as its
    /// watches and this process's own applies know them; `None` while a
    /// watch has not listed everything yet (ask the member instead).
    pub fn kinds_present(
        &self,
        dc: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Vec<&'static str>> {
        let present = lock(&self.present);
        let copy = (namespace.to_owned(), name.to_owned());
        let mut kinds = Vec::new();
        for kind in KINDS {
            let index = present.get(&(dc.to_owned(), kind))?;
            if !index.synced {
                return None;
            }
            if index.copies.contains(&copy) {
                kinds.push(kind);
            }
        }
        drop(present);
        // Applied a moment ago, perhaps not seen by the watch yet.
        if let Some(kind) =
            self.applied_kind(&(dc.to_owned(), namespace.to_owned(), name.to_owned()))
            && !kinds.contains(&kind)
        {
            kinds.push(kind);
        }
        Some(kinds)
    }

    /// Every copy in `dc`'s member as its watches know them (kind, copy
    /// namespace, copy name); `None` while a watch has not listed
    /// everything yet (ask the member instead).
    pub fn copies_in(&self, dc: &str) -> Option<Vec<(&'static str, String, String)>> {
        let present = lock(&self.present);
        let mut copies = Vec::new();
        for kind in KINDS {
            let index = present.get(&(dc.to_owned(), kind))?;
            if !index.synced {
                return None;
            }
            copies.extend(
                index
                    .copies
                    .iter()
                    .map(|(namespace, name)| (kind, namespace.clone(), name.clone())),
            );
        }
        Some(copies)
    }

    /// Whether `namespace` was made in `dc`'s member by this process.
    pub fn has_namespace(&self, dc: &str, namespace: &str) -> bool {
        lock(&self.namespaces).contains(&(dc.to_owned(), namespace.to_owned()))
    }

    /// Records (or, with `false`, forgets) a namespace made in a member.
    pub fn set_namespace(&self, dc: &str, namespace: &str, made: bool) {
        let key = (dc.to_owned(), namespace.to_owned());
        let mut namespaces = lock(&self.namespaces);
        if made {
            namespaces.insert(key);
        } else {
            namespaces.remove(&key);
        }
    }

    /// The cached client of `dc`, if one was made.
    pub fn cached(&self, dc: &str) -> Option<Client> {
        self.lock().get(dc).map(|m| m.client.clone())
    }

    /// The client of `dc`, made from its kubeconfig Secret (read through
    /// `control`) unless the cached one was made from the same Secret version.
    ///
    /// A Secret that is gone, or no longer holds a kubeconfig that loads,
    /// also drops the cached client: deleting or emptying the Secret is how
    /// a platform engineer takes the operator's access to a member away, and
    /// the old credentials must not go on being used. So does the control
    /// cluster refusing the operator the Secret (403): taking that right
    /// away is the other way to do it. (Any other failure to read the
    /// Secret keeps the client.)
    ///
    /// # Errors
    /// No Secret reference, a missing Secret or key, or a kubeconfig that
    /// does not load.
    pub async fn connect(&self, control: &Client, dc: &DataCenter) -> Result<Client, Error> {
        let connected = self.connect_from_secret(control, dc).await;
        if let Err(Error::Kubeconfig { data_center, .. }) = &connected {
            if self.lock().contains_key(data_center) {
                tracing::warn!(
                    data_center,
                    "dropping the member's client: its kubeconfig Secret no longer gives one"
                );
            }
            self.forget(data_center);
        }
        connected
    }

    async fn connect_from_secret(
        &self,
        control: &Client,
        dc: &DataCenter,
    ) -> Result<Client, Error> {
        let name = dc.name_any();
        let invalid = |message: String| Error::Kubeconfig {
            data_center: name.clone(),
            message,
        };
        let reference = dc
            .spec
            .kubeconfig_secret_ref
            .as_ref()
            .ok_or_else(|| invalid("spec.kubeconfigSecretRef is not set".to_owned()))?;
        let source = (
            reference.namespace.clone(),
            reference.name.clone(),
            reference.key.clone(),
        );
        if let Some(member) = self.lock().get_mut(&name)
            && member.secret == source
            && member
                .read_at
                .is_some_and(|at| at.elapsed() < self.secret_reread)
        {
            return Ok(member.client.clone());
        }
        let drops_before = self.drops(&name);
        let secrets: Api<Secret> = Api::namespaced(control.clone(), &reference.namespace);
        let secret = secrets
            .get_opt(&reference.name)
            .await
            .map_err(|e| match e {
                kube::Error::Api(status) if status.code == 403 => invalid(format!(
                    "the operator may not read Secret {}/{} (forbidden)",
                    reference.namespace, reference.name
                )),
                e => Error::Kube(e),
            })?
            .ok_or_else(|| {
                invalid(format!(
                    "Secret {}/{} not found",
                    reference.namespace, reference.name
                ))
            })?;
        let version = secret.resource_version().unwrap_or_default();
        if let Some(member) = self.lock().get_mut(&name)
            && member.version == version
            && member.secret == source
        {
            member.read_at = Some(std::time::Instant::now());
            return Ok(member.client.clone());
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&reference.key))
            .ok_or_else(|| {
                invalid(format!(
                    "Secret {}/{} has no key `{}`",
                    reference.namespace, reference.name, reference.key
                ))
            })?;
        let text = std::str::from_utf8(&bytes.0)
            .map_err(|_| invalid("the kubeconfig is not UTF-8".to_owned()))?;
        let kubeconfig = Kubeconfig::from_yaml(text)
            .map_err(|e| invalid(format!("the kubeconfig does not parse: {e}")))?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| invalid(format!("the kubeconfig does not load: {e}")))?;
        config.connect_timeout = Some(self.timeout);
        // Watches stay open with nothing to read; only requests time out.
        let watching = Client::try_from(config.clone())
            .map_err(|e| invalid(format!("no client from the kubeconfig: {e}")))?;
        let client = request_client(config, self.timeout)
            .map_err(|e| invalid(format!("no client from the kubeconfig: {e}")))?;
        // Checked, watched and recorded under one lock: a drop in between
        // would otherwise be undone.
        let mut clients = self.lock();
        if self.drops(&name) != drops_before {
            // A connect that began after the drop may have made a client
            // already: that one stands.
            if let Some(member) = clients.get(&name) {
                return Ok(member.client.clone());
            }
            return Err(invalid(
                "the operator's access was taken away while it connected".to_owned(),
            ));
        }
        let watches = vec![
            self.watch_copies::<Deployment>(&name, &watching, "Deployment", |d| {
                children::ready_replicas(&Child::Deployment(d.clone()))
            }),
            self.watch_copies::<StatefulSet>(&name, &watching, "StatefulSet", |s| {
                children::ready_replicas(&Child::StatefulSet(s.clone()))
            }),
            self.watch_copies::<Job>(&name, &watching, "Job", |j| {
                children::ready_replicas(&Child::Job(j.clone()))
            }),
        ];
        clients.insert(
            name,
            Member {
                version,
                secret: source,
                read_at: Some(std::time::Instant::now()),
                client: client.clone(),
                cluster_id: None,
                watches,
            },
        );
        drop(clients);
        Ok(client)
    }

    /// Reads `dc`'s kubeconfig Secret again at the next connect: a probe
    /// failed, perhaps because the credentials were rotated.
    pub fn read_secret_again(&self, dc: &str) {
        if let Some(member) = self.lock().get_mut(dc) {
            member.read_at = None;
        }
    }

    /// Forgets the client of a deleted data center.
    pub fn forget(&self, dc: &str) {
        let mut clients = self.lock();
        clients.remove(dc);
        *lock(&self.dropped).entry(dc.to_owned()).or_default() += 1;
        drop(clients);
        lock(&self.present).retain(|(member, _), _| member != dc);
    }

    fn drops(&self, dc: &str) -> u64 {
        lock(&self.dropped).get(dc).copied().unwrap_or(0)
    }

    /// The identity of `dc`'s member cluster (`member` is its client): the
    /// UID of its `kube-system` namespace, as Karmada identifies clusters.
    /// Read once per client.
    ///
    /// # Errors
    /// The member does not answer, or does not let the operator read the
    /// namespace.
    pub async fn cluster_id(&self, dc: &str, member: &Client) -> Result<String, Error> {
        if let Some(id) = self.lock().get(dc).and_then(|m| m.cluster_id.clone()) {
            return Ok(id);
        }
        let namespaces: Api<Namespace> = Api::all(member.clone());
        let id = namespaces
            .get("kube-system")
            .await
            .map_err(|source| Error::Member {
                data_center: dc.to_owned(),
                source,
            })?
            .metadata
            .uid
            .ok_or_else(|| {
                Error::Internal(format!(
                    "the member of data center `{dc}` gave namespace kube-system no UID"
                ))
            })?;
        if let Some(m) = self.lock().get_mut(dc) {
            m.cluster_id = Some(id.clone());
        }
        Ok(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Member>> {
        lock(&self.clients)
    }

    /// Watches one kind of the operator's copies in a member: keeps each
    /// copy's readiness, forgets what was applied when someone else changed
    /// or deleted it, and names the owning workload of each change. Retries
    /// with backoff while the member is down.
    fn watch_copies<K>(
        &self,
        data_center: &str,
        member: &Client,
        kind: &'static str,
        ready: fn(&K) -> i32,
    ) -> tokio::task::JoinHandle<()>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        let api: Api<K> = Api::all(member.clone());
        let changes = self.changes.clone();
        let copies = self.copies.clone();
        let present = self.present.clone();
        let data_center = data_center.to_owned();
        // A client replaced by a new one (its Secret changed) starts over.
        lock(&present).insert((data_center.clone(), kind), Present::default());
        tokio::spawn(async move {
            // This data center's copies only: data centers may share a
            // member cluster, and one's copies are never another's.
            let config = watcher::Config::default().labels(&format!(
                "{},{}={data_center}",
                children::managed_selector(),
                children::DATA_CENTER
            ));
            let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                let (copy, deleted) = match event {
                    // A fresh list: anything may have changed while away.
                    watcher::Event::Init => {
                        lock(&copies).retain(|(dc, _, _), _| *dc != data_center);
                        let mut present = lock(&present);
                        let index = present.entry((data_center.clone(), kind)).or_default();
                        index.synced = false;
                        index.copies.clear();
                        continue;
                    }
                    watcher::Event::InitDone => {
                        lock(&present)
                            .entry((data_center.clone(), kind))
                            .or_default()
                            .synced = true;
                        continue;
                    }
                    watcher::Event::Apply(copy) | watcher::Event::InitApply(copy) => (copy, false),
                    watcher::Event::Delete(copy) => (copy, true),
                };
                let labels = copy.labels();
                let (Some(namespace), Some(name)) = (
                    labels.get(children::WORKLOAD_NAMESPACE),
                    labels.get(children::WORKLOAD_NAME),
                ) else {
                    continue;
                };
                // A copy is named as its workload. An object whose labels
                // name another is not one: acting on the labels would let
                // whoever can label an object in the member have the
                // operator delete a different one.
                if copy.namespace().as_ref() != Some(namespace) || copy.name_any() != *name {
                    continue;
                }
                {
                    // Keyed by owner, as listing by the owner's labels
                    // would find it (a copy is named as its workload).
                    let at = (namespace.clone(), name.clone());
                    let mut present = lock(&present);
                    let index = present.entry((data_center.clone(), kind)).or_default();
                    if deleted {
                        index.copies.remove(&at);
                    } else {
                        index.copies.insert(at);
                    }
                }
                let key = (data_center.clone(), namespace.clone(), name.clone());
                // Only what the workload's status or its copy depends on
                // wakes it: readiness, drift from what was applied, deletion.
                // Every other status update of the copy would cost a
                // reconcile for nothing.
                let matters = {
                    let mut copies = lock(&copies);
                    if deleted {
                        copies.remove(&key);
                        true
                    } else {
                        let state = copies.entry(key).or_default();
                        let now_ready = ready(&copy);
                        let mut matters =
                            std::mem::replace(&mut state.ready, now_ready) != now_ready;
                        if state
                            .applied
                            .is_some_and(|(_, generation)| generation != copy.meta().generation)
                        {
                            state.applied = None;
                            matters = true;
                        }
                        matters
                    }
                };
                if !matters {
                    continue;
                }
                if changes
                    .unbounded_send(ObjectRef::new(name).within(namespace))
                    .is_err()
                {
                    return;
                }
            }
        })
    }
}

/// A panic while holding these locks cannot leave the maps inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Allocatable capacity summed over the member's Ready, schedulable nodes;
/// GPUs by the model label of their node.
///
/// # Errors
/// The member does not answer.
pub async fn node_capacity(member: &Client, data_center: &str) -> Result<Capacity, Error> {
    let nodes: Api<Node> = Api::all(member.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Member {
            data_center: data_center.to_owned(),
            source,
        })?;
    Ok(sum_nodes(&list.items))
}

/// The pure part of [`node_capacity`].
pub fn sum_nodes(nodes: &[Node]) -> Capacity {
    let (mut cpu, mut memory, mut ephemeral) = (0u64, 0u64, 0u64);
    let mut gpus: BTreeMap<String, u32> = BTreeMap::new();
    for node in nodes {
        let schedulable = !node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !(schedulable && ready) {
            continue;
        }
        let Some(allocatable) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) else {
            continue;
        };
        let get = |key: &str| allocatable.get(key).map(|q| q.0.as_str());
        cpu += get("cpu")
            .and_then(|q| quantity::cpu_millis(q).ok())
            .unwrap_or(0);
        memory += get("memory")
            .and_then(|q| quantity::bytes(q).ok())
            .unwrap_or(0);
        ephemeral += get("ephemeral-storage")
            .and_then(|q| quantity::bytes(q).ok())
            .unwrap_or(0);
        if let Some(count) = get(GPU_RESOURCE).and_then(|q| q.parse::<u32>().ok())
            && count > 0
        {
            let model = node
                .labels()
                .get(GPU_MODEL_LABEL)
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned());
            *gpus.entry(model).or_default() += count;
        }
    }
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    Capacity {
        cpu: Quantity(format!("{cpu}m")),
        memory: Quantity(memory.to_string()),
        ephemeral_storage: (ephemeral > 0).then(|| Quantity(ephemeral.to_string())),
        gpus,
    }
}

/// A client whose every request must be answered within `timeout`, counted
/// from when the request is sent. Every kube client with a timeout should be
/// made here (the test harness's are too).
pub fn request_client(mut config: kube::Config, timeout: Duration) -> Result<Client, kube::Error> {
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    // Otherwise the read timeout also runs while a pooled connection sits
    // idle, and a request handed a connection idle for almost `timeout`
    // fails with "timed out" however fast the member answers.
    config.reset_reader_on_write = true;
    Client::try_from(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request on a pooled connection that sat idle for most of the
    /// timeout still gets the whole timeout for its answer.
    #[tokio::test]
    async fn idle_time_in_the_pool_does_not_count_against_a_request() {
        const ANSWER_AFTER: Duration = Duration::from_millis(300);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(ANSWER_AFTER).await;
                "answered"
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{address}").parse().unwrap());
        let client = request_client(config, Duration::from_millis(600)).unwrap();
        let slow = || async {
            client
                .request_text(http::Request::get("/slow").body(Vec::new()).unwrap())
                .await
        };
        assert_eq!(slow().await.unwrap(), "answered");
        // Idle for 450 of the 600 ms, then a request that takes 300 ms on
        // the same connection: counted from the idle start it would time out.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(slow().await.unwrap(), "answered");
    }

    /// A control API server for `connect`: it serves the kubeconfig Secret
    /// `civicgrid-system/edge-kubeconfig`, or 403 while `forbidden` is set,
    /// and holds each answer until `release` lets it go (when `hold` is
    /// set), telling `asked` when a request arrives.
    struct ControlApi {
        address: std::net::SocketAddr,
        forbidden: Arc<std::sync::atomic::AtomicBool>,
        hold: Arc<std::sync::atomic::AtomicBool>,
        asked: Arc<tokio::sync::Notify>,
        release: Arc<tokio::sync::Notify>,
    }

    impl ControlApi {
        async fn start() -> Self {
            use std::sync::atomic::{AtomicBool, Ordering};
            let kubeconfig = "apiVersion: v1\nkind: Config\n\
                clusters: [{name: m, cluster: {server: 'http://127.0.0.1:9'}}]\n\
                users: [{name: u, user: {token: t}}]\n\
                contexts: [{name: c, context: {cluster: m, user: u}}]\n\
                current-context: c\n";
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("edge-kubeconfig".into()),
                    namespace: Some("civicgrid-system".into()),
                    resource_version: Some("1".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "kubeconfig".to_owned(),
                    k8s_openapi::ByteString(kubeconfig.as_bytes().to_vec()),
                )])),
                ..Default::default()
            };
            let body = serde_json::to_string(&secret).unwrap();
            let forbidden = Arc::new(AtomicBool::new(false));
            let hold = Arc::new(AtomicBool::new(false));
            let asked = Arc::new(tokio::sync::Notify::new());
            let release = Arc::new(tokio::sync::Notify::new());
            let state = (
                forbidden.clone(),
                hold.clone(),
                asked.clone(),
                release.clone(),
            );
            let app = axum::Router::new().route(
                "/api/v1/namespaces/civicgrid-system/secrets/edge-kubeconfig",
                axum::routing::get(move || {
                    let (forbidden, hold, asked, release) = state.clone();
                    let body = body.clone();
                    async move {
                        asked.notify_one();
                        if hold.load(Ordering::SeqCst) {
                            release.notified().await;
                        }
                        if forbidden.load(Ordering::SeqCst) {
                            return (
                                http::StatusCode::FORBIDDEN,
                                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"secrets \"edge-kubeconfig\" is forbidden","reason":"Forbidden","code":403}"#.to_owned(),
                            );
                        }
                        (http::StatusCode::OK, body)
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self {
                address,
                forbidden,
                hold,
                asked,
                release,
            }
        }

        fn client(&self) -> Client {
            let config = kube::Config::new(format!("http://{}", self.address).parse().unwrap());
            Client::try_from(config).unwrap()
        }
    }

    fn edge() -> DataCenter {
        DataCenter::new(
            "edge",
            serde_json::from_value(serde_json::json!({
                "tier": "edge", "region": "city",
                "kubeconfigSecretRef": {
                    "name": "edge-kubeconfig", "namespace": "civicgrid-system", "key": "kubeconfig"
                }
            }))
            .unwrap(),
        )
    }

    /// The control cluster refusing the operator the Secret (its right to
    /// read it taken away) drops the client it had, as a deleted Secret
    /// does; other failures would keep it.
    #[tokio::test]
    async fn a_forbidden_secret_drops_the_members_client() {
        let api = ControlApi::start().await;
        let (changes, _) = futures::channel::mpsc::unbounded();
        let members = Members::new(Duration::from_secs(1), Duration::ZERO, changes);
        members.connect(&api.client(), &edge()).await.unwrap();
        assert!(members.cached("edge").is_some());
        api.forbidden
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let Err(refused) = members.connect(&api.client(), &edge()).await else {
            panic!("connected with a Secret the operator may not read");
        };
        assert!(
            refused
                .to_string()
                .contains("the operator may not read Secret civicgrid-system/edge-kubeconfig"),
            "{refused}"
        );
        assert!(members.cached("edge").is_none());
    }

    /// A connect that read the Secret before the data center's client was
    /// dropped (its Secret deleted, its right revoked, the data center
    /// deleted) does not put a client back; the next connect does.
    #[tokio::test]
    async fn a_connect_under_way_when_the_client_is_dropped_keeps_nothing() {
        use std::sync::atomic::Ordering;
        let api = ControlApi::start().await;
        let (changes, _) = futures::channel::mpsc::unbounded();
        let members = Arc::new(Members::new(
            Duration::from_secs(1),
            Duration::ZERO,
            changes,
        ));
        api.hold.store(true, Ordering::SeqCst);
        let asked = api.asked.notified();
        let connecting = tokio::spawn({
            let members = members.clone();
            let client = api.client();
            async move { members.connect(&client, &edge()).await }
        });
        asked.await;
        members.forget("edge");
        api.release.notify_one();
        let Err(late) = connecting.await.unwrap() else {
            panic!("a connect under way put a client back");
        };
        assert!(
            late.to_string().contains("taken away while it connected"),
            "{late}"
        );
        assert!(members.cached("edge").is_none());
        api.hold.store(false, Ordering::SeqCst);
        members.connect(&api.client(), &edge()).await.unwrap();
        assert!(members.cached("edge").is_some());
    }

    #[test]
    fn copies_are_known_from_the_watches_only_once_every_kind_has_listed() {
        let (changes, _) = futures::channel::mpsc::unbounded();
        let members = Members::new(Duration::from_secs(1), Duration::from_secs(60), changes);
        let set = |kind: &'static str, synced: bool, copies: &[(&str, &str)]| {
            lock(&members.present).insert(
                ("edge-east".to_owned(), kind),
                Present {
                    synced,
                    copies: copies
                        .iter()
                        .map(|&(ns, name)| (ns.to_owned(), name.to_owned()))
                        .collect(),
                },
            );
        };
        // No watch has started: ask the member.
        assert_eq!(members.kinds_present("edge-east", "video", "cams"), None);
        set("Deployment", true, &[("video", "cams")]);
        set("StatefulSet", true, &[]);
        set("Job", false, &[]);
        assert_eq!(members.kinds_present("edge-east", "video", "cams"), None);
        set("Job", true, &[("video", "other")]);
        assert_eq!(
            members.kinds_present("edge-east", "video", "cams"),
            Some(vec!["Deployment"])
        );
        assert_eq!(
            members.kinds_present("edge-east", "video", "absent"),
            Some(vec![])
        );
        // Applied by this process a moment ago, not yet seen by the watch.
        members.applied(
            ("edge-east".into(), "video".into(), "batch".into()),
            "Job",
            7,
            Some(1),
            0,
        );
        assert_eq!(
            members.kinds_present("edge-east", "video", "batch"),
            Some(vec!["Job"])
        );
        // Another data center's watches say nothing about this one.
        assert_eq!(
            members.kinds_present("partner-cloud", "video", "cams"),
            None
        );
    }

    fn node(cpu: &str, memory: &str, ready: bool, gpus: Option<(&str, &str)>) -> Node {
        let mut allocatable = serde_json::json!({ "cpu": cpu, "memory": memory });
        let mut labels = serde_json::json!({});
        if let Some((model, count)) = gpus {
            allocatable[GPU_RESOURCE] = serde_json::json!(count);
            labels[GPU_MODEL_LABEL] = serde_json::json!(model);
        }
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "n", "labels": labels },
            "status": { "allocatable": allocatable,
                        "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] }
        }))
        .expect("node")
    }

    #[test]
    fn sums_ready_nodes_and_counts_gpus_by_model() {
        let capacity = sum_nodes(&[
            node("8", "32Gi", true, Some(("nvidia-l4", "2"))),
            node("500m", "1Gi", true, Some(("nvidia-l4", "1"))),
            node("64", "256Gi", false, Some(("nvidia-a100", "8"))),
        ]);
        assert_eq!(capacity.cpu.0, "8500m");
        assert_eq!(capacity.memory.0, (33u64 << 30).to_string());
        assert_eq!(capacity.gpus, BTreeMap::from([("nvidia-l4".to_owned(), 3)]));
    }
}
