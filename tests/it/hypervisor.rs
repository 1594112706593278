//! A VM's whole lifecycle on a real hypervisor: libvirtd with QEMU (`qemu:///system`), installed
//! and started by the test where it can be (root, Debian's package registry reachable). Where it
//! cannot, the test says why and passes without checking anything: this machine cannot tell.

use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually};

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim())),
        Err(e) => Err(format!("{program}: {e}")),
    }
}

/// Installs and starts libvirtd with QEMU, or says why it cannot.
fn hypervisor() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Err("not root: cannot install or start libvirtd".into());
    }
    if Command::new("libvirtd").arg("--version").output().is_err() {
        // Debian 12's qemu-utils, pinned: a newer one from backports blocks the install otherwise.
        run("apt-get", &["update", "-qq"])?;
        let packages = ["libvirt-daemon-system", "qemu-system-x86", "qemu-utils=1:7.2+dfsg-7+deb12u18+b3"];
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends", "--allow-downgrades"];
        args.extend(packages);
        run("apt-get", &args).map_err(|e| format!("cannot install the hypervisor: {e}"))?;
    }
    // QEMU runs as a member of group kvm; a device open to root alone makes every define slow
    // and KVM domains fail.
    if std::path::Path::new("/dev/kvm").exists() {
        let _ = run("chown", &["root:kvm", "/dev/kvm"]);
        let _ = run("chmod", &["0660", "/dev/kvm"]);
    }
    for daemon in ["virtlogd", "libvirtd"] {
        if run("pgrep", &["-x", daemon]).is_err() {
            run(daemon, &["-d"])?;
        }
    }
    // A freshly started libvirtd on a loaded machine can take a while to answer: a generous
    // wait, since giving up here skips the test silently.
    let deadline = std::time::Instant::now() + runtimeai_tests::EVENTUALLY;
    while std::time::Instant::now() < deadline {
        if run("virsh", &["-c", "qemu:///system", "version"]).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("libvirtd did not answer on qemu:///system within {:?}", runtimeai_tests::EVENTUALLY))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lives_its_whole_lifecycle_on_qemu() -> anyhow::Result<()> {
    if let Err(why) = tokio::task::spawn_blocking(hypervisor).await? {
        eprintln!("SKIPPED a_vm_lives_its_whole_lifecycle_on_qemu: {why}");
        return Ok(());
    }
    let args = ["--backends", "vm=libvirt:qemu:///system", "--signals-interval-ms", "300"];
    let cluster = Cluster::start(
        1,
        ClusterOptions { extra_args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() },
    )
    .await?;
    let long = Duration::from_secs(120);
    let tiny = json!({"event_retention_count": 1000, "event_retention_days": 30, "sizes": [
        {"name": "tiny", "cpu": 1.0, "memory": "64Mi", "replicas": 1, "cost_per_hour": 0.01},
        {"name": "wee", "cpu": 2.0, "memory": "96Mi", "replicas": 1, "cost_per_hour": 0.02}
    ]});
    assert_eq!(cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&tiny), &[]).await?.status, 200);

    phase("create: a qcow2 disk, a domain defined with our metadata, started");
    let created = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "qemu-vm", "type": "vm", "spec": {"size": "tiny"}})),
            &[],
        )
        .await?;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    let mut domains = Domains::default();
    let domain = domains.of(&id);
    let done = cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), long).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let state = Command::new("virsh").args(["-c", "qemu:///system", "domstate", &domain]).output()?;
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "running");
    let xml = Command::new("virsh").args(["-c", "qemu:///system", "dumpxml", &domain]).output()?;
    assert!(String::from_utf8_lossy(&xml.stdout).contains(&format!("id=\"{id}\"")), "metadata names the runtime");

    phase("its CPU use measured from the CPU time QEMU reports, as the seed shapes signals");
    let status_path = format!("/v1/runtimes/{id}/status");
    let deadline = std::time::Instant::now() + long;
    let cpu = loop {
        let status = cluster.call_eventually(1, Method::GET, &status_path, None, &[]).await?;
        let cpu = status.body["signals"]["cpu"].clone();
        if cpu["unit"] == "vCPU" || std::time::Instant::now() > deadline {
            break cpu;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(cpu["unit"] == "vCPU" && cpu["value"].as_f64().is_some_and(|used| used <= 1.5), "{cpu}");

    let lifecycle = |action: &str| format!("/v1/runtimes/{id}/lifecycle/{action}");
    let step = |action: &'static str, body: Option<serde_json::Value>| {
        let cluster = &cluster;
        let path = lifecycle(action);
        async move {
            let accepted = cluster.call_eventually(1, Method::POST, &path, body.as_ref(), &[]).await?;
            anyhow::ensure!(accepted.status == 202, "{action}: {accepted:?}");
            let done = cluster.wait_operation(1, accepted.body["id"].as_str().unwrap(), long).await?;
            anyhow::ensure!(done["status"] == "succeeded", "{action}: {done}");
            Ok::<_, anyhow::Error>(done)
        }
    };
    phase("snapshot and restore with libvirt's snapshots; scale; stop (no OS answers ACPI: forced after the timeout); start; delete");
    let snapshot = step("snapshot", Some(json!({"name": "first"}))).await?;
    let snapshot_id = snapshot["params"]["snapshot_id"].as_str().unwrap().to_string();
    step("restore", Some(json!({"snapshot_id": snapshot_id}))).await?;
    let scaled = step("scale", Some(json!({"size": "wee"}))).await?;
    let said = scaled["results"][0]["message"].as_str().unwrap_or_default();
    assert!(said.contains("2 vCPUs, 96 MiB"), "the backend says what it applied and how: {scaled}");
    step("stop", Some(json!({"force": true, "timeout_seconds": 3}))).await?;
    let state = Command::new("virsh").args(["-c", "qemu:///system", "domstate", &domain]).output()?;
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "shut off");
    step("start", None).await?;
    phase("pause and resume: the domain suspended and running again");
    step("pause", None).await?;
    let state = Command::new("virsh").args(["-c", "qemu:///system", "domstate", &domain]).output()?;
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "paused");
    step("resume", None).await?;
    let accepted = cluster.call_eventually(1, Method::DELETE, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    let done = cluster.wait_operation(1, accepted.body["id"].as_str().unwrap(), long).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let gone = Command::new("virsh").args(["-c", "qemu:///system", "domstate", &domain]).output()?;
    assert!(!gone.status.success(), "the domain is undefined");
    Ok(())
}

/// Destroys and undefines, when dropped, the domains of the runtimes a test made: a test that
/// fails midway must not leave guests running after its cluster is gone.
#[derive(Default)]
struct Domains(Vec<String>);

impl Domains {
    fn of(&mut self, runtime_id: &str) -> String {
        let domain = format!("rtai-{runtime_id}");
        self.0.push(domain.clone());
        domain
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for domain in &self.0 {
            let _ = Command::new("virsh").args(["-c", "qemu:///system", "destroy", domain]).output();
            let _ = Command::new("virsh").args(["-c", "qemu:///system", "undefine", domain]).output();
        }
    }
}

/// The modules the guest needs to read its NoCloud seed from QEMU's IDE CD-ROM, in load order.
const SEED_MODULES: [&str; 7] = ["scsi_common", "scsi_mod", "libata", "ata_piix", "cdrom", "sr_mod", "isofs"];

/// The guest's init: mounts the seed and prints it to the serial console, then idles.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /seed
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /lib/modules/$m.ko; done
echo "runtimeai-guest: booted $(uname -r)"
for i in $(seq 1 40); do [ -b /dev/sr0 ] && break; sleep 0.25; done
if mount -t iso9660 -o ro /dev/sr0 /seed; then
  echo "runtimeai-guest: user-data follows"; cat /seed/user-data
  echo "runtimeai-guest: meta-data follows"; cat /seed/meta-data
else
  echo "runtimeai-guest: no seed"
fi
while :; do sleep 3600; done
"#;

/// A VM image the test makes itself: Debian's kernel (fetched with apt, kept between runs) and
/// an initramfs of BusyBox, the seed's modules and [`GUEST_INIT`]. Returns its directory.
fn guest_image(work: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let cache =
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/runtimeai/guest-kernel");
    if !cache.join("done").exists() {
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let depends =
            Command::new("apt-cache").args(["depends", "linux-image-amd64"]).output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&depends.stdout).to_string();
        let package = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")))
            .ok_or("apt knows no Debian kernel")?
            .to_string();
        let fetched = Command::new("apt-get").current_dir(&cache).args(["download", "-qq", &package]).output();
        fetched.ok().filter(|o| o.status.success()).ok_or("cannot fetch the Debian kernel package")?;
        let deb = std::fs::read_dir(&cache)
            .map_err(|e| e.to_string())?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".deb"));
        let deb = deb.ok_or("no kernel package was fetched")?.path();
        run("dpkg-deb", &["-x", deb.to_str().unwrap(), cache.join("root").to_str().unwrap()])?;
        std::fs::write(cache.join("done"), "").map_err(|e| e.to_string())?;
    }
    let root = cache.join("root");
    let kernel = std::fs::read_dir(root.join("boot"))
        .map_err(|e| e.to_string())?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz"));
    let kernel = kernel.ok_or("the kernel package holds no vmlinuz")?.path();
    let image = work.join("guest");
    let initramfs = work.join("initramfs");
    for dir in [image.join("x"), initramfs.join("bin"), initramfs.join("lib/modules")] {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    }
    std::fs::copy("/bin/busybox", initramfs.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    let modules = find_files(&root.join("lib/modules"));
    for module in SEED_MODULES {
        let found = modules.iter().find(|p| p.file_name().is_some_and(|n| n == format!("{module}.ko").as_str()));
        let found = found.ok_or(format!("the kernel package has no {module}.ko"))?;
        std::fs::copy(found, initramfs.join("lib/modules").join(format!("{module}.ko"))).map_err(|e| e.to_string())?;
    }
    std::fs::write(initramfs.join("modules"), SEED_MODULES.join(" ")).map_err(|e| e.to_string())?;
    std::fs::write(initramfs.join("init"), GUEST_INIT).map_err(|e| e.to_string())?;
    run("chmod", &["755", initramfs.join("init").to_str().unwrap()])?;
    let script = "find . | busybox cpio -o -H newc 2>/dev/null | busybox gzip -1";
    let archive = Command::new("busybox")
        .args(["sh", "-c", script])
        .current_dir(&initramfs)
        .output()
        .map_err(|e| e.to_string())?;
    std::fs::write(image.join("initrd"), archive.stdout).map_err(|e| e.to_string())?;
    std::fs::copy(&kernel, image.join("kernel")).map_err(|e| e.to_string())?;
    std::fs::write(image.join("cmdline"), "console=ttyS0 quiet panic=-1").map_err(|e| e.to_string())?;
    run("qemu-img", &["create", "-q", "-f", "qcow2", image.join("disk.qcow2").to_str().unwrap(), "16M"])?;
    let _ = std::fs::remove_dir_all(image.join("x"));
    Ok(image)
}

fn find_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(find_files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_boots_its_image_reads_its_user_data_and_prints_to_its_console() -> anyhow::Result<()> {
    if let Err(why) = tokio::task::spawn_blocking(hypervisor).await? {
        eprintln!("SKIPPED a_vm_boots_its_image_reads_its_user_data_and_prints_to_its_console: {why}");
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let image = match tokio::task::spawn_blocking({
        let work = work.path().to_path_buf();
        move || guest_image(&work)
    })
    .await?
    {
        Ok(image) => image,
        Err(why) => {
            assert!(std::env::var_os("RUNTIMEAI_REQUIRE_SANDBOXES").is_none(), "cannot make the guest image: {why}");
            eprintln!("SKIPPED: cannot make the guest image: {why}");
            return Ok(());
        }
    };
    // TCG: KVM, where a machine has it, may be nested and hang a guest (it does on these
    // machines: `--vm-accel` is for that).
    let args = ["--backends", "vm=libvirt:qemu:///system", "--signals-interval-ms", "300", "--vm-accel", "tcg"];
    let options = ClusterOptions { extra_args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() };
    let cluster = Cluster::start(2, options).await?;
    let long = Duration::from_secs(180);
    let sizes = json!({"event_retention_count": 1000, "event_retention_days": 30, "sizes": [
        {"name": "guest", "cpu": 1.0, "memory": "256Mi", "replicas": 1, "cost_per_hour": 0.01}]});
    assert_eq!(cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&sizes), &[]).await?.status, 200);

    phase("the image imported into the node's store by the CLI; a name nobody imported is refused");
    let data_dir = cluster.node(1).data_dir.clone();
    let import = |data_dir: &std::path::Path| {
        Command::new(runtimeai_tests::binary())
            .args(["vm-image", "import", "guest"])
            .arg(&image)
            .arg("--data-dir")
            .arg(data_dir)
            .output()
    };
    let imported = import(&data_dir)?;
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    assert!(String::from_utf8_lossy(&imported.stdout).contains("disk.qcow2, kernel, initrd, cmdline"));
    let again = import(&data_dir)?;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("imported already"));
    let other_data_dir = cluster.node(2).data_dir.clone();
    let imported = import(&other_data_dir)?;
    assert!(imported.status.success(), "the same image on node 2: {}", String::from_utf8_lossy(&imported.stderr));
    let unknown = json!({"name": "nowhere", "type": "vm", "spec": {"size": "guest", "image": "nosuch"}});
    let unknown = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&unknown), &[]).await?;
    let failed = cluster.wait_operation(1, unknown.body["active_operation"].as_str().unwrap(), long).await?;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap_or_default().contains("vm-image import nosuch"), "{failed}");

    phase("a VM from the image with cloud-init data: its console shows it booted and read them");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE8r9xK6b7w1ApPFsJbQzcFpHUlYkqEoBFdE2Yfzx2vG test@runtimeai";
    let body = json!({"name": "booted", "type": "vm", "spec": {"size": "guest", "image": "guest",
        "user_data": "#cloud-config\nruncmd:\n  - echo hello from user data\n", "ssh_authorized_keys": [key]}});
    let created = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    let mut domains = Domains::default();
    domains.of(&id);
    let done = cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), long).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (host, other) = match created.body["placement"]["node_id"].as_u64() {
        Some(1) => (data_dir.clone(), 2),
        _ => (other_data_dir.clone(), 1),
    };
    let disk = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json"])
        .arg(host.join(format!("backends/libvirt/disks/rtai-{id}.qcow2")))
        .output()?;
    let disk: serde_json::Value = serde_json::from_slice(&disk.stdout)?;
    assert_eq!(disk["format"], "qcow2", "{disk}");
    let backing = disk["backing-filename"].as_str().unwrap_or_default();
    assert!(backing.ends_with("vm-images/guest/disk.qcow2"), "an overlay on the image's disk: {disk}");
    let console = format!("/v1/runtimes/{id}/console");
    let deadline = std::time::Instant::now() + long;
    let printed = loop {
        let answer = cluster.call_eventually(1, Method::GET, &console, None, &[]).await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        // A serial line ends in CR LF.
        let text = answer.body.as_str().unwrap_or_default().replace("\r\n", "\n");
        if text.contains("meta-data follows") && text.contains("public-keys") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(printed.contains("runtimeai-guest: booted"), "{printed}");
    assert!(
        printed.contains("runtimeai-guest: user-data follows\n#cloud-config\nruncmd:\n  - echo hello from user data"),
        "{printed}"
    );
    assert!(printed.contains(&format!("instance-id: {id}")) && printed.contains(key), "{printed}");

    let stranger = key_for(&cluster, 1, "stranger", "human", &["globex"], &["operator"], None).await?;
    let hidden = cluster.call_as(Some(&stranger), 1, Method::GET, &console, None, &[]).await?;
    assert_eq!(hidden.status, 404, "another tenant's VM console is not there: {hidden:?}");

    phase("migrated to the other node: its overlay on that node's copy of the image, booted there");
    let there = if other == 2 { other_data_dir.clone() } else { data_dir.clone() };
    let migrate = format!("/v1/runtimes/{id}/lifecycle/migrate");
    let accepted = cluster.call_eventually(1, Method::POST, &migrate, Some(&json!({"node_id": other})), &[]).await?;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let done = cluster.wait_operation(1, accepted.body["id"].as_str().unwrap(), long).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let moved = there.join(format!("backends/libvirt/disks/rtai-{id}.qcow2"));
    let disk = Command::new("qemu-img").args(["info", "--force-share", "--output=json"]).arg(&moved).output()?;
    let disk: serde_json::Value = serde_json::from_slice(&disk.stdout)?;
    let backing = disk["backing-filename"].as_str().unwrap_or_default();
    assert_eq!(backing, there.join("vm-images/guest/disk.qcow2").display().to_string(), "rebased here: {disk}");
    let deadline = std::time::Instant::now() + long;
    let printed = loop {
        let answer = cluster.call_eventually(other, Method::GET, &console, None, &[]).await?;
        let text = answer.body.as_str().unwrap_or_default().to_string();
        if text.matches("runtimeai-guest: booted").count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(printed.matches("runtimeai-guest: booted").count(), 2, "its console came along, and it booted again");
    let left = host.join(format!("backends/libvirt/disks/rtai-{id}.qcow2"));
    let deadline = std::time::Instant::now() + long;
    while left.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!left.exists(), "the old node removes its copy of the disk");

    phase("deleted: its disk, seed and console go with it");
    let accepted = cluster.call_eventually(1, Method::DELETE, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    cluster.wait_operation(1, accepted.body["id"].as_str().unwrap(), long).await?;
    let seed = there.join(format!("backends/libvirt/disks/rtai-{id}-seed.iso"));
    assert!(!seed.exists() && !moved.exists(), "the seed and the disk go with the VM");
    Ok(())
}
