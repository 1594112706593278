//! Virtual machines through libvirt (the `virt` crate).
//!
//! A runtime is the domain `rtai-<runtime id>`, defined from the RuntimeSpec (vCPUs, memory, on
//! QEMU a thin qcow2 disk made with `qemu-img`, a network interface on `--libvirt-network` only
//! when its networking lets it reach out), with the runtime's id, name and labels in the
//! domain's metadata so a domain can be matched back to its runtime. start = create,
//! stop = shutdown, then (with `force`) destroy after the timeout, restart = reboot, scale =
//! vCPUs and memory (live where the domain allows it, else in the configuration for the next
//! boot, and the message says so), snapshot / restore = libvirt domain snapshots named by the
//! snapshot id. Every call converges when repeated.
//!
//! The connection URI is configuration: `qemu:///system` on a hypervisor host, libvirt's
//! built-in `test:///default` driver anywhere (its domains live in the node's connection, so
//! they are gone when the node restarts). A libvirt host is node-local: a VM's operations run
//! on the node it is placed on.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use runtimeai_model::Runtime;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use super::vm_boot::{self, DirectBoot, VmImageStore};
use super::vm_export::{self, Manifest};
use super::{BackendError, CallContext, CpuMeter, Observed, Resources, RuntimeBackend, StepLedger};
use crate::config::VmAccel;

/// XML namespace of the metadata RuntimeAI keeps in its domains.
pub const METADATA_NS: &str = "https://runtimeai.dev/xmlns/runtime/1";

#[derive(Debug)]
pub struct LibvirtBackend {
    uri: String,
    /// One connection for the node's life (the test driver's state lives in it); reopened
    /// after a connection-level failure.
    connection: Mutex<Option<Connect>>,
    ledger: StepLedger,
    /// Where QEMU disks are made (unused by the test driver).
    disk_dir: PathBuf,
    /// The libvirt network a VM joins when its spec lets it talk to the outside (open egress,
    /// or internal/public exposure); otherwise it gets no network interface at all.
    network: String,
    /// Each domain's CPU time at its last status look.
    cpu: CpuMeter,
    /// The node's VM images, which `spec.image` names.
    images: VmImageStore,
    accel: VmAccel,
}

/// What a domain is given besides its vCPUs and memory.
#[derive(Default)]
struct Media<'a> {
    disk: Option<&'a Path>,
    /// The cloud-init NoCloud seed, as a CD-ROM.
    seed: Option<&'a Path>,
    /// Where its serial console's output is kept.
    console: Option<&'a Path>,
    kernel: Option<&'a DirectBoot>,
}

fn classify(error: virt::error::Error) -> BackendError {
    let message = format!("libvirt: {}", error.message());
    match error.code() {
        Enum::Known(
            ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::NoConnect
            | ErrorNumber::OperationTimeout
            | ErrorNumber::AgentUnresponsive,
        ) => BackendError::Retryable(message),
        Enum::Known(ErrorNumber::NoSupport | ErrorNumber::ArgumentUnsupported) => BackendError::Unsupported(message),
        _ => BackendError::Permanent(message),
    }
}

fn is_missing(error: &virt::error::Error) -> bool {
    matches!(error.code(), Enum::Known(ErrorNumber::NoDomain | ErrorNumber::NoDomainSnapshot))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// The domain's name for a runtime.
pub fn domain_name(runtime: &Runtime) -> String {
    format!("rtai-{}", runtime.id)
}

impl LibvirtBackend {
    /// Checks that `uri` can be opened, without keeping anything (a node checks its drivers
    /// before it touches its store).
    pub fn probe(uri: &str) -> Result<(), BackendError> {
        // libvirt prints every error itself unless told not to; ours say it once, with context.
        virt::error::clear_error_callback();
        Connect::open(Some(uri)).map(drop).map_err(classify)
    }

    /// Opens the connection now, so a wrong URI is a clear error at start.
    pub fn connect(uri: &str, state_dir: PathBuf, network: &str) -> Result<LibvirtBackend, BackendError> {
        virt::error::clear_error_callback();
        let connection = Connect::open(Some(uri)).map_err(classify)?;
        let ledger = StepLedger::open(state_dir.join("ledger"))?;
        let disk_dir = state_dir.join("disks");
        std::fs::create_dir_all(&disk_dir)?;
        Ok(LibvirtBackend {
            uri: uri.to_string(),
            connection: Mutex::new(Some(connection)),
            ledger,
            disk_dir,
            network: network.to_string(),
            cpu: CpuMeter::default(),
            images: VmImageStore::new(state_dir.join("images")),
            accel: VmAccel::Auto,
        })
    }

    /// Runs QEMU's vCPUs as `accel` says.
    pub fn with_accel(mut self, accel: VmAccel) -> LibvirtBackend {
        self.accel = accel;
        self
    }

    /// Takes VM images from `images` (the node's store) rather than its state directory's.
    pub fn with_images(mut self, images: VmImageStore) -> LibvirtBackend {
        self.images = images;
        self
    }

    fn is_test_driver(&self) -> bool {
        self.uri.starts_with("test:")
    }

    fn connection(&self) -> Result<Connect, BackendError> {
        let mut guard = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|c| !c.is_alive().unwrap_or(false)) {
            *guard = Some(Connect::open(Some(&self.uri)).map_err(classify)?);
        }
        Ok(guard.clone().expect("just opened"))
    }

    /// Runs blocking libvirt work on the blocking pool, fenced and remembered by the ledger.
    async fn step<F>(&self, cx: &CallContext, work: F) -> Result<String, BackendError>
    where
        F: FnOnce(&Connect) -> Result<String, BackendError> + Send + 'static,
    {
        let connection = self.connection()?;
        let ledger = self.ledger.clone();
        let cx = cx.clone();
        tokio::task::spawn_blocking(move || {
            let (step, message) = ledger.run(&cx, || work(&connection))?;
            Ok(match step {
                super::Step::AlreadyApplied => "already applied (a retry converges)".to_string(),
                super::Step::Fresh => message.unwrap_or_default(),
            })
        })
        .await
        .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))?
    }

    fn domain_xml(&self, runtime: &Runtime, resources: &Resources, media: &Media<'_>) -> String {
        let memory_kib = (resources.memory_bytes / 1024).max(65_536);
        let vcpus = resources.cpu.ceil().max(1.0) as u32;
        let kind = match self.accel {
            _ if self.is_test_driver() => "test",
            VmAccel::Kvm => "kvm",
            VmAccel::Auto if kvm_usable() => "kvm",
            VmAccel::Auto | VmAccel::Tcg => "qemu",
        };
        let labels: String = runtime
            .labels
            .iter()
            .map(|(k, v)| format!("<runtimeai:label key=\"{}\" value=\"{}\"/>", escape(k), escape(v)))
            .collect();
        let path = |p: &Path| escape(&p.display().to_string());
        let mut devices = String::new();
        if let Some(disk) = media.disk {
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                path(disk)
            ));
        }
        if let Some(seed) = media.seed {
            devices.push_str(&format!(
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/>\
                 <target dev='hdc' bus='ide'/><readonly/></disk>",
                path(seed)
            ));
        }
        let networking = runtime.spec.networking.clone().unwrap_or_default();
        let reaches_out = networking.egress_policy == runtimeai_model::EgressPolicy::Open
            || networking.exposure != runtimeai_model::Exposure::Private;
        if reaches_out {
            devices.push_str(&format!(
                "<interface type='network'><source network='{}'/><model type='virtio'/></interface>",
                escape(&self.network)
            ));
        }
        if let Some(console) = media.console {
            // A pty for `virsh console`, its output also appended to a file the API serves.
            devices.push_str(&format!(
                "<serial type='pty'><log file='{}' append='on'/><target port='0'/></serial>\
                 <console type='pty'><target type='serial' port='0'/></console>",
                path(console)
            ));
        }
        let os = match media.kernel {
            Some(boot) => format!(
                "<kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline>",
                path(&boot.kernel),
                path(&boot.initrd),
                escape(&boot.cmdline)
            ),
            None => "<boot dev='hd'/>".to_string(),
        };
        let devices = if devices.is_empty() { devices } else { format!("<devices>{devices}</devices>") };
        format!(
            "<domain type='{kind}'><name>{name}</name>\
             <metadata><runtimeai:runtime xmlns:runtimeai=\"{METADATA_NS}\" id=\"{id}\" name=\"{rname}\">{labels}</runtimeai:runtime></metadata>\
             <memory unit='KiB'>{memory_kib}</memory><currentMemory unit='KiB'>{memory_kib}</currentMemory>\
             <vcpu placement='static'>{vcpus}</vcpu>\
             <os><type arch='x86_64'>hvm</type>{os}</os>{devices}</domain>",
            name = domain_name(runtime),
            id = escape(&runtime.id),
            rname = escape(&runtime.name),
        )
    }

    /// Removes the domain and this node's files of it; with `only_ours`, the domain only if its
    /// disk is this node's (a hypervisor other nodes on the host share may hold another node's
    /// domain of that name).
    async fn remove_here(&self, cx: &CallContext, runtime: &Runtime, only_ours: bool) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        let (disk, seed, console) = (self.disk_path(runtime), self.seed_path(runtime), self.console_path(runtime));
        let test_driver = self.is_test_driver();
        self.cpu.forget(&runtime.id);
        self.step(cx, move |connection| {
            let ours = || -> Result<bool, BackendError> {
                let Some(domain) = lookup(connection, &name)? else { return Ok(false) };
                Ok(test_driver || domain.xml_desc(0).map_err(classify)?.contains(&escape(&disk.display().to_string())))
            };
            if !only_ours || ours()? {
                remove_domain(connection, &name)?;
            }
            remove_files(&[&disk, &seed, &console])?;
            Ok(if only_ours {
                format!("what this node held of domain {name} removed")
            } else {
                format!("domain {name} removed")
            })
        })
        .await
    }

    /// Makes what the domain needs on this node (its disk unless it has one, its cloud-init
    /// seed) and returns its definition.
    async fn prepare(&self, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        let image = self.image_of(runtime)?;
        // The test driver runs nothing: no disk, seed or console for it.
        let real = !self.is_test_driver();
        let disk = real.then(|| self.disk_path(runtime));
        if let Some(path) = &disk {
            vm_boot::make_disk(path, image.disk.as_deref()).await?;
        }
        let seed = self.seed_path(runtime);
        let seeded = real && vm_boot::make_seed(&seed, runtime).await?;
        let console = self.console_path(runtime);
        let media = Media {
            disk: disk.as_deref(),
            seed: seeded.then_some(seed.as_path()),
            console: real.then_some(console.as_path()),
            kernel: image.kernel.as_ref(),
        };
        Ok(self.domain_xml(runtime, resources, &media))
    }

    /// The image `spec.image` names in this node's store (none: an empty disk).
    fn image_of(&self, runtime: &Runtime) -> Result<vm_boot::BootImage, BackendError> {
        Ok(runtime.spec.image.as_deref().map(|image| self.images.image(image)).transpose()?.unwrap_or_default())
    }

    /// The SHA-256 of the disk of the VM's image, if it has one.
    async fn image_digest(&self, runtime: &Runtime) -> Result<Option<String>, BackendError> {
        let Some(disk) = self.image_of(runtime)?.disk else { return Ok(None) };
        let digest = tokio::task::spawn_blocking(move || vm_export::image_digest(&disk)).await;
        Ok(Some(digest.map_err(|e| BackendError::Retryable(format!("digest task: {e}")))??))
    }

    fn disk_path(&self, runtime: &Runtime) -> PathBuf {
        self.disk_dir.join(format!("{}.qcow2", domain_name(runtime)))
    }

    fn seed_path(&self, runtime: &Runtime) -> PathBuf {
        self.disk_dir.join(format!("{}-seed.iso", domain_name(runtime)))
    }

    /// Where the domain's serial console output is kept (appended across its boots).
    fn console_path(&self, runtime: &Runtime) -> PathBuf {
        self.disk_dir.join(format!("{}.console", domain_name(runtime)))
    }
}

#[async_trait::async_trait]
impl runtimeai_api::ConsoleSource for LibvirtBackend {
    async fn console(&self, runtime: &Runtime, bytes: u64) -> Result<Vec<u8>, String> {
        if self.is_test_driver() {
            return Err("the test hypervisor runs no guests: there is no console".to_string());
        }
        let path = self.console_path(runtime);
        tokio::task::spawn_blocking(move || vm_boot::last_bytes(&path, bytes))
            .await
            .map_err(|e| format!("console task: {e}"))?
    }
}

/// Whether QEMU (which libvirt runs as an unprivileged user of group `kvm`) can use KVM: the
/// device must be open to its group. Else QEMU emulates in software.
fn kvm_usable() -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata("/dev/kvm").is_ok_and(|m| m.permissions().mode() & 0o060 == 0o060)
}

fn lookup(connection: &Connect, name: &str) -> Result<Option<Domain>, BackendError> {
    match connection.lookup_domain_by_name(name) {
        Ok(domain) => Ok(Some(domain)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(classify(e)),
    }
}

fn domain(connection: &Connect, name: &str) -> Result<Domain, BackendError> {
    lookup(connection, name)?.ok_or_else(|| {
        BackendError::Permanent(format!("libvirt has no domain {name}: it was removed outside RuntimeAI"))
    })
}

fn active(domain: &Domain) -> Result<bool, BackendError> {
    domain.is_active().map_err(classify)
}

fn paused(domain: &Domain) -> Result<bool, BackendError> {
    let state = domain.info().map_err(classify)?.state;
    Ok(matches!(state, Enum::Known(DomainState::Paused)))
}

/// Shuts the domain down: an ACPI request, then, with `force`, power off after `timeout`.
fn shut_down(domain: &Domain, name: &str, force: bool, timeout: Duration) -> Result<String, BackendError> {
    if !active(domain)? {
        return Ok(format!("domain {name} already shut off"));
    }
    // A suspended guest hears no ACPI request: it runs again first.
    if paused(domain)? {
        domain.resume().map_err(classify)?;
    }
    // A guest may ignore the ACPI request (or have no OS to hear it): wait, then, with force,
    // power it off.
    let _ = domain.shutdown();
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !active(domain)? {
            return Ok(format!("domain {name} shut down"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !force {
        return Err(BackendError::Permanent(format!(
            "domain {name} did not shut down within {}s; stop with force to power it off",
            timeout.as_secs()
        )));
    }
    domain.destroy().map_err(classify)?;
    Ok(format!("domain {name} powered off after {}s without a clean shutdown", timeout.as_secs()))
}

/// Removes those of `files` that exist.
fn remove_files(files: &[&Path]) -> std::io::Result<()> {
    for file in files.iter().filter(|file| file.exists()) {
        std::fs::remove_file(file)?;
    }
    Ok(())
}

/// Powers the domain off and undefines it with its snapshots' metadata, if there is one.
fn remove_domain(connection: &Connect, name: &str) -> Result<(), BackendError> {
    if let Some(domain) = lookup(connection, name)? {
        if active(&domain)? {
            domain.destroy().map_err(classify)?;
        }
        domain.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA).map_err(classify)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl RuntimeBackend for LibvirtBackend {
    fn driver(&self) -> &'static str {
        "libvirt"
    }

    fn shared(&self) -> bool {
        false
    }

    fn capabilities(&self) -> &'static [runtimeai_model::ActionKind] {
        super::PAUSE_AND_MIGRATE
    }

    async fn create(&self, cx: &CallContext, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        let xml = self.prepare(runtime, resources).await?;
        self.step(cx, move |connection| {
            let domain = match lookup(connection, &name)? {
                Some(domain) => domain,
                None => connection.define_domain_xml(&xml).map_err(classify)?,
            };
            if !active(&domain)? {
                domain.create().map_err(classify)?;
            }
            Ok(format!("domain {name} defined and started"))
        })
        .await
    }

    async fn delete(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.remove_here(cx, runtime, false).await
    }

    async fn start(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            if !active(&domain)? {
                domain.create().map_err(classify)?;
            }
            Ok(format!("domain {name} running"))
        })
        .await
    }

    async fn stop(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        force: bool,
        timeout: Duration,
    ) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        self.step(cx, move |connection| shut_down(&domain(connection, &name)?, &name, force, timeout)).await
    }

    async fn restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            if active(&domain)? {
                domain.reboot(sys::VIR_DOMAIN_REBOOT_DEFAULT).map_err(classify)?;
                Ok(format!("domain {name} rebooted"))
            } else {
                domain.create().map_err(classify)?;
                Ok(format!("domain {name} was shut off: started"))
            }
        })
        .await
    }

    async fn scale(&self, cx: &CallContext, runtime: &Runtime, target: &Resources) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        let vcpus = target.cpu.ceil().max(1.0) as u32;
        let memory_kib = (target.memory_bytes / 1024).max(65_536);
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            let config = sys::VIR_DOMAIN_AFFECT_CONFIG;
            let live = sys::VIR_DOMAIN_AFFECT_LIVE;
            // The configuration first (maximums, then current values), so the next boot has it.
            domain.set_vcpus_flags(vcpus, sys::VIR_DOMAIN_VCPU_MAXIMUM | config).map_err(classify)?;
            domain.set_vcpus_flags(vcpus, config).map_err(classify)?;
            domain.set_memory_flags(memory_kib, sys::VIR_DOMAIN_MEM_MAXIMUM | config).map_err(classify)?;
            domain.set_memory_flags(memory_kib, config).map_err(classify)?;
            if !active(&domain)? {
                return Ok(format!("domain {name}: {vcpus} vCPUs, {} MiB from its next start", memory_kib / 1024));
            }
            let live_ok =
                domain.set_vcpus_flags(vcpus, live).is_ok() && domain.set_memory_flags(memory_kib, live).is_ok();
            Ok(if live_ok {
                format!("domain {name}: {vcpus} vCPUs, {} MiB, applied live", memory_kib / 1024)
            } else {
                format!(
                    "domain {name}: {vcpus} vCPUs, {} MiB in its configuration; restart required to take effect",
                    memory_kib / 1024
                )
            })
        })
        .await
    }

    async fn snapshot(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        snapshot_id: &str,
        label: &str,
    ) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        let xml = format!(
            "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
            escape(snapshot_id),
            escape(label)
        );
        let snapshot_id = snapshot_id.to_string();
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            match Domain::lookup_snapshot_by_name(&domain, &snapshot_id, 0) {
                Ok(_) => Ok(format!("snapshot {snapshot_id} of {name} exists")),
                Err(e) if is_missing(&e) => {
                    domain.create_snapshot_xml(&xml, 0).map_err(classify)?;
                    Ok(format!("snapshot {snapshot_id} of {name} taken"))
                }
                Err(e) => Err(classify(e)),
            }
        })
        .await
    }

    async fn restore(&self, cx: &CallContext, runtime: &Runtime, snapshot_id: &str) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        let snapshot_id = snapshot_id.to_string();
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            let snapshot = Domain::lookup_snapshot_by_name(&domain, &snapshot_id, 0).map_err(|e| {
                if is_missing(&e) {
                    BackendError::Permanent(format!("libvirt has no snapshot {snapshot_id} of {name}"))
                } else {
                    classify(e)
                }
            })?;
            snapshot.revert(0).map_err(classify)?;
            Ok(format!("domain {name} reverted to snapshot {snapshot_id}"))
        })
        .await
    }

    async fn pause(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            if !active(&domain)? {
                return Err(BackendError::Permanent(format!("domain {name} is shut off: nothing to pause")));
            }
            if !paused(&domain)? {
                domain.suspend().map_err(classify)?;
            }
            Ok(format!("domain {name} suspended, its memory kept"))
        })
        .await
    }

    async fn resume(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let name = domain_name(runtime);
        self.step(cx, move |connection| {
            let domain = domain(connection, &name)?;
            if paused(&domain)? {
                domain.resume().map_err(classify)?;
            }
            Ok(format!("domain {name} running again"))
        })
        .await
    }

    async fn export(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        timeout: Duration,
        into: &Path,
    ) -> Result<String, BackendError> {
        // Fenced, and done again when asked again (a transfer cut off asks anew).
        self.ledger.begin(cx)?;
        let (name, connection) = (domain_name(runtime), self.connection()?);
        let stopped = tokio::task::spawn_blocking(move || {
            let domain = domain(&connection, &name)?;
            let stopped = shut_down(&domain, &name, true, timeout)?;
            let mut snapshots = Vec::new();
            for snapshot in domain.list_all_snapshots(0).map_err(classify)? {
                snapshots.push((snapshot.name().map_err(classify)?, snapshot.xml_desc(0).map_err(classify)?));
            }
            Ok::<_, BackendError>((stopped, snapshots, domain.uuid_string().map_err(classify)?))
        })
        .await
        .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))?;
        let (stopped, snapshots, uuid) = stopped?;
        let (disk, console) = (self.disk_path(runtime), self.console_path(runtime));
        let count = snapshots.len();
        let manifest = Manifest {
            uuid: Some(uuid),
            image: runtime.spec.image.clone(),
            image_sha256: self.image_digest(runtime).await?,
            snapshots,
            disk: disk.exists(),
        };
        vm_export::pack(into, &manifest, &disk, &console).await?;
        let what = if manifest.disk { "its disk" } else { "its definition" };
        Ok(format!("{stopped}; {what} and {count} snapshots packed"))
    }

    async fn import(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        resources: &Resources,
        from: Option<&Path>,
        run: bool,
    ) -> Result<String, BackendError> {
        if self.ledger.begin(cx)? == super::Step::AlreadyApplied {
            return Ok("already applied (a retry converges)".to_string());
        }
        let (name, connection) = (domain_name(runtime), self.connection()?);
        // A domain of this name left here (an earlier stay, an attempt cut off) is replaced.
        let (stale, gone) = (connection.clone(), name.clone());
        tokio::task::spawn_blocking(move || remove_domain(&stale, &gone))
            .await
            .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))??;
        let (disk, console) = (self.disk_path(runtime), self.console_path(runtime));
        remove_files(&[&disk, &console])?;
        let manifest = match from {
            Some(from) => vm_export::unpack(from, &disk, &console).await?,
            None => Manifest::default(),
        };
        if manifest.disk {
            let ours = self.image_digest(runtime).await?;
            if ours != manifest.image_sha256 {
                let image = manifest.image.as_deref().unwrap_or("none");
                return Err(BackendError::Permanent(format!(
                    "VM image {image:?} differs here (SHA-256 {}) from the VM's node's ({}): import the same image",
                    ours.as_deref().unwrap_or("none"),
                    manifest.image_sha256.as_deref().unwrap_or("none")
                )));
            }
            vm_export::rebase(&disk, self.image_of(runtime)?.disk.as_deref()).await?;
        }
        let xml = self.prepare(runtime, resources).await?;
        // The domain keeps its identity (its snapshots' definitions name its UUID).
        let xml = match &manifest.uuid {
            Some(uuid) => xml.replacen("</name>", &format!("</name><uuid>{}</uuid>", escape(uuid)), 1),
            None => xml,
        };
        let count = manifest.snapshots.len();
        let made = tokio::task::spawn_blocking(move || {
            let domain = connection.define_domain_xml(&xml).map_err(classify)?;
            for (_, snapshot) in &manifest.snapshots {
                domain.create_snapshot_xml(snapshot, sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE).map_err(classify)?;
            }
            if run {
                domain.create().map_err(classify)?;
            }
            Ok::<_, BackendError>(())
        })
        .await
        .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))?;
        made?;
        self.ledger.finish(cx)?;
        let how = if from.is_some() { "from its export" } else { "afresh from its spec" };
        let started = if run { ", started" } else { "" };
        Ok(format!("domain {name} defined {how} with {count} snapshots{started}"))
    }

    async fn held(&self) -> Vec<String> {
        let Ok(connection) = self.connection() else { return Vec::new() };
        let (test_driver, disk_dir) = (self.is_test_driver(), self.disk_dir.clone());
        let held = tokio::task::spawn_blocking(move || {
            let domains = connection.list_all_domains(0).unwrap_or_default();
            let ids = domains.iter().filter_map(|d| d.name().ok()?.strip_prefix("rtai-").map(String::from));
            // A hypervisor other nodes on this host may share: only the domains whose disk is ours.
            ids.filter(|id| test_driver || disk_dir.join(format!("rtai-{id}.qcow2")).exists()).collect::<Vec<_>>()
        });
        held.await.unwrap_or_default()
    }

    async fn release(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.remove_here(cx, runtime, true).await
    }

    async fn list_snapshots(&self, runtime: &Runtime) -> Result<Vec<String>, BackendError> {
        let name = domain_name(runtime);
        let connection = self.connection()?;
        tokio::task::spawn_blocking(move || {
            let domain = domain(&connection, &name)?;
            let snapshots = domain.list_all_snapshots(0).map_err(classify)?;
            snapshots.iter().map(|s| s.name().map_err(classify)).collect()
        })
        .await
        .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))?
    }

    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError> {
        let name = domain_name(runtime);
        let connection = self.connection()?;
        let (meter, id) = (self.cpu.clone(), runtime.id.clone());
        tokio::task::spawn_blocking(move || {
            let Some(domain) = lookup(&connection, &name)? else { return Ok(Observed::Missing) };
            let info = domain.info().map_err(classify)?;
            Ok(match info.state {
                Enum::Known(DomainState::Paused) => Observed::Paused,
                Enum::Known(DomainState::Running | DomainState::Blocked) => Observed::Running {
                    // The CPU time the hypervisor counts for the domain, between two looks.
                    cpu: meter.look(&id, info.cpu_time),
                    disk_bytes: None,
                    memory_bytes: info.memory * 1024,
                    latency_ms: None,
                },
                Enum::Known(DomainState::Crashed) => Observed::Failed(format!("domain {name} crashed")),
                _ => Observed::Stopped,
            })
        })
        .await
        .map_err(|e| BackendError::Retryable(format!("libvirt task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::{RuntimeType, SizeEntry};

    fn cx(operation: &str) -> CallContext {
        CallContext { operation_id: operation.into(), step: 0, token: 1 }
    }

    /// A VM moved between two nodes' hypervisors (the test driver): stopped for the export,
    /// defined on the other with its snapshots, started; a stale executor's export is fenced.
    #[tokio::test]
    async fn a_vm_moves_to_another_node_with_its_snapshots_on_the_test_driver() {
        let (here, there) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = LibvirtBackend::connect("test:///default", here.path().to_path_buf(), "default").unwrap();
        let destination = LibvirtBackend::connect("test:///default", there.path().to_path_buf(), "default").unwrap();
        let runtime = Runtime::new("rt_moving", "mover", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        let resources = Resources::of(&runtime, &runtimeai_model::default_sizes());
        source.create(&cx("op_create"), &runtime, &resources).await.unwrap();
        source.snapshot(&cx("op_snapshot"), &runtime, "snap_1", "before").await.unwrap();

        let export = here.path().join("move.export");
        let said = crate::backend::contract::export_fenced(&source, &runtime, &export, 4).await;
        assert!(said.contains("its definition and 1 snapshots packed"), "{said}");

        let arriving = CallContext { operation_id: "op_move".into(), step: 0, token: 4 };
        let said = destination.import(&arriving, &runtime, &resources, Some(&export), true).await.unwrap();
        assert!(said.contains("from its export with 1 snapshots, started"), "{said}");
        assert!(matches!(destination.status(&runtime).await.unwrap(), Observed::Running { .. }));
        assert_eq!(destination.list_snapshots(&runtime).await.unwrap(), ["snap_1"]);
        destination.restore(&cx("op_restore"), &runtime, "snap_1").await.unwrap();
        let again = destination.import(&arriving, &runtime, &resources, Some(&export), true).await.unwrap();
        assert!(again.contains("already applied"), "a retried step converges: {again}");
        assert!(destination.held().await.contains(&"rt_moving".to_string()));
        destination.delete(&cx("op_delete"), &runtime).await.unwrap();
    }

    /// The whole lifecycle against libvirt's own test driver (the real library, its built-in
    /// hypervisor): every call twice, to show it converges.
    #[tokio::test]
    async fn a_vm_goes_through_its_lifecycle_on_the_test_driver() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LibvirtBackend::connect("test:///default", dir.path().to_path_buf(), "default").unwrap();
        let mut runtime = Runtime::new("rt_lifecycle", "web", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        runtime.labels.insert("team".into(), "risk & ops".into());
        let sizes: Vec<SizeEntry> = runtimeai_model::default_sizes();
        runtime.spec.size = Some("small".into());
        let small = Resources::of(&runtime, &sizes);
        for attempt in ["op_create", "op_create_retry"] {
            let message = backend.create(&cx(attempt), &runtime, &small).await.unwrap();
            assert!(message.contains("rtai-rt_lifecycle"), "{message}");
        }
        let Observed::Running { memory_bytes, .. } = backend.status(&runtime).await.unwrap() else {
            panic!("not running")
        };
        let connection = backend.connection().unwrap();
        let domain = connection.lookup_domain_by_name("rtai-rt_lifecycle").unwrap();
        assert_eq!((domain.info().unwrap().nr_virt_cpu, memory_bytes), (1, 2 << 30));
        let metadata = domain.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0).unwrap();
        assert!(metadata.contains("id=\"rt_lifecycle\"") && metadata.contains("risk &amp; ops"), "{metadata}");

        let xml = domain.xml_desc(0).unwrap();
        assert!(!xml.contains("<interface"), "a private VM with restricted egress has no network interface: {xml}");
        let mut open = Runtime::new("rt_open", "edge", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        open.spec.networking = Some(runtimeai_model::NetworkingProfile {
            egress_policy: runtimeai_model::EgressPolicy::Open,
            ..Default::default()
        });
        backend.create(&cx("op_open"), &open, &small).await.unwrap();
        let xml = connection.lookup_domain_by_name("rtai-rt_open").unwrap().xml_desc(0).unwrap();
        assert!(xml.contains("<source network='default'"), "open egress joins the libvirt network: {xml}");
        backend.delete(&cx("op_open_delete"), &open).await.unwrap();

        backend.stop(&cx("op_stop"), &runtime, false, Duration::from_secs(5)).await.unwrap();
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Stopped);
        backend.stop(&cx("op_stop_again"), &runtime, false, Duration::from_secs(5)).await.unwrap();
        let large = Resources { cpu: 4.0, memory_bytes: 8 << 30, replicas: 1 };
        let message = backend.scale(&cx("op_scale"), &runtime, &large).await.unwrap();
        assert!(message.contains("next start"), "{message}");
        backend.start(&cx("op_start"), &runtime).await.unwrap();
        assert!(matches!(backend.status(&runtime).await.unwrap(), Observed::Running { .. }), "running");
        assert_eq!(domain.info().unwrap().nr_virt_cpu, 4, "the new size after the boot");

        backend.snapshot(&cx("op_snap"), &runtime, "snap_1", "before").await.unwrap();
        backend.snapshot(&cx("op_snap_retry"), &runtime, "snap_1", "before").await.unwrap();
        assert_eq!(backend.list_snapshots(&runtime).await.unwrap(), ["snap_1"]);
        backend.restore(&cx("op_restore"), &runtime, "snap_1").await.unwrap();
        let missing = backend.restore(&cx("op_restore_bad"), &runtime, "snap_404").await.unwrap_err();
        assert!(matches!(missing, BackendError::Permanent(_)), "{missing}");
        backend.restart(&cx("op_restart"), &runtime).await.unwrap();

        for attempt in ["op_pause", "op_pause_retry"] {
            backend.pause(&cx(attempt), &runtime).await.unwrap();
        }
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Paused);
        backend.resume(&cx("op_resume"), &runtime).await.unwrap();
        assert!(matches!(backend.status(&runtime).await.unwrap(), Observed::Running { .. }));
        backend.pause(&cx("op_pause_before_stop"), &runtime).await.unwrap();
        backend.stop(&cx("op_stop_paused"), &runtime, true, Duration::from_secs(5)).await.unwrap();
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Stopped, "a suspended domain stops");
        let off = backend.pause(&cx("op_pause_off"), &runtime).await.unwrap_err();
        assert!(off.to_string().contains("shut off"), "{off}");

        backend.delete(&cx("op_delete"), &runtime).await.unwrap();
        backend.delete(&cx("op_delete_retry"), &runtime).await.unwrap();
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Missing);
        let gone = backend.start(&cx("op_start_gone"), &runtime).await.unwrap_err();
        assert!(gone.to_string().contains("outside RuntimeAI"), "{gone}");
    }
}
