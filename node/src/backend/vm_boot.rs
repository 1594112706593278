//! What a VM boots from on this node: an image from the node's VM image store, its own disk as
//! a copy-on-write overlay of the image's, its cloud-init NoCloud seed, and the file its serial
//! console writes to.
//!
//! An image is a directory `<store>/<name>/` holding `disk.qcow2` (the base disk) and, for a
//! guest its kernel boots directly rather than a boot loader on the disk, `kernel`, `initrd`
//! and `cmdline`. `runtimeai vm-image import <name> <source>` makes one from a disk image (any
//! format `qemu-img` reads) or a directory of those files. A VM without an image gets an empty
//! disk.

use std::path::{Path, PathBuf};

use runtimeai_model::Runtime;

use super::BackendError;

/// The size of a VM's disk when its image has none.
const EMPTY_DISK: &str = "1G";

/// A node's VM images.
#[derive(Debug, Clone)]
pub struct VmImageStore {
    dir: PathBuf,
}

/// What an image gives a VM to boot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BootImage {
    /// The disk its overlay is made on.
    pub disk: Option<PathBuf>,
    /// A kernel to boot directly, its initial ram disk and its command line.
    pub kernel: Option<DirectBoot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl VmImageStore {
    pub fn new(dir: PathBuf) -> VmImageStore {
        VmImageStore { dir }
    }

    /// The store of the node whose data directory is `data_dir`.
    pub fn in_data_dir(data_dir: &Path) -> VmImageStore {
        VmImageStore::new(data_dir.join("vm-images"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image named `name`; a permanent error naming the store when there is none.
    pub fn image(&self, name: &str) -> Result<BootImage, BackendError> {
        let valid = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        let dir = self.dir.join(name);
        if !valid || !dir.is_dir() {
            return Err(BackendError::Permanent(format!(
                "this node has no VM image {name:?} in {}; import it with `runtimeai vm-image import {name} <disk or directory>`",
                self.dir.display()
            )));
        }
        let disk = Some(dir.join("disk.qcow2")).filter(|d| d.exists());
        let kernel = match (dir.join("kernel"), dir.join("initrd")) {
            (kernel, initrd) if kernel.exists() && initrd.exists() => {
                let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default().trim().to_string();
                Some(DirectBoot { kernel, initrd, cmdline })
            }
            _ => None,
        };
        if disk.is_none() && kernel.is_none() {
            return Err(BackendError::Permanent(format!("VM image {name:?} has neither a disk nor a kernel")));
        }
        Ok(BootImage { disk, kernel })
    }

    /// Imports `source` as image `name`: a directory's `disk.qcow2`, `kernel`, `initrd` and
    /// `cmdline` are copied; a file, or what an `http(s)://` URL serves, is converted to the
    /// image's qcow2 disk by `qemu-img`. The image appears whole or not at all (made beside the
    /// store, then renamed into it).
    pub fn import(&self, name: &str, source: &str) -> Result<String, String> {
        let valid = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !valid {
            return Err(format!("{name:?}: an image is named by 1-63 of [a-z0-9._-]"));
        }
        let target = self.dir.join(name);
        if target.exists() {
            return Err(format!("{} exists: VM image {name:?} was imported already", target.display()));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let partial = self.dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        let copied = if source.starts_with("http://") || source.starts_with("https://") {
            let fetched = partial.join("fetched");
            download(source, &fetched).and_then(|_| convert(&fetched, &partial.join("disk.qcow2"))).map(|what| {
                let _ = std::fs::remove_file(&fetched);
                format!("{what} from {source}")
            })
        } else if Path::new(source).is_dir() {
            copy_parts(Path::new(source), &partial)
        } else {
            convert(Path::new(source), &partial.join("disk.qcow2"))
        };
        let made = copied.and_then(|what| {
            std::fs::rename(&partial, &target).map_err(|e| format!("{}: {e}", target.display()))?;
            Ok(what)
        });
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        made.map(|what| format!("VM image {name:?} imported into {} ({what})", target.display()))
    }
}

/// Copies an image's files from a directory; says which.
fn copy_parts(source: &Path, to: &Path) -> Result<String, String> {
    let mut found = Vec::new();
    for part in ["disk.qcow2", "kernel", "initrd", "cmdline"] {
        let from = source.join(part);
        if from.exists() && part == "disk.qcow2" {
            stands_alone(&from)?;
        }
        if from.exists() {
            std::fs::copy(&from, to.join(part)).map_err(|e| format!("{}: {e}", from.display()))?;
            found.push(part);
        }
    }
    let boots = found.contains(&"disk.qcow2") || (found.contains(&"kernel") && found.contains(&"initrd"));
    if !boots {
        return Err(format!("{} holds neither disk.qcow2 nor a kernel and an initrd", source.display()));
    }
    Ok(found.join(", "))
}

/// Fetches `url` to `to`, as it comes (a cloud image is hundreds of megabytes).
fn download(url: &str, to: &Path) -> Result<(), String> {
    use std::io::Write;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut response = reqwest::get(url).await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: {}", response.status()));
        }
        let mut file = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            file.write_all(&chunk).map_err(|e| format!("{}: {e}", to.display()))?;
        }
        Ok(())
    })
}

/// Refuses a disk image that names a backing file: converting or booting it would read that
/// file of the node (a crafted qcow2 naming `/etc/shadow` copies the host's into the image).
fn stands_alone(disk: &Path) -> Result<(), String> {
    let output = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(disk)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !output.status.success() {
        return Err(format!("qemu-img info {}: {}", disk.display(), String::from_utf8_lossy(&output.stderr).trim()));
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    match info.get("backing-filename").and_then(|b| b.as_str()) {
        Some(backing) => Err(format!("{} names a backing file ({backing}): an image must stand alone", disk.display())),
        None => Ok(()),
    }
}

/// Converts a disk image of any format `qemu-img` reads to qcow2.
fn convert(source: &Path, to: &Path) -> Result<String, String> {
    stands_alone(source)?;
    let output = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(source)
        .arg(to)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img convert {}: {}",
            source.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok("disk.qcow2".to_string())
}

/// Makes a VM's disk unless it exists: an overlay on `base` (reads fall through to it, writes
/// stay in the overlay), or an empty disk.
pub async fn make_disk(path: &Path, base: Option<&Path>) -> Result<(), BackendError> {
    if path.exists() {
        return Ok(());
    }
    let mut qemu_img = tokio::process::Command::new("qemu-img");
    qemu_img.args(["create", "-q", "-f", "qcow2"]);
    match base {
        Some(base) => qemu_img.arg("-b").arg(base).args(["-F", "qcow2"]).arg(path),
        None => qemu_img.arg(path).arg(EMPTY_DISK),
    };
    let output = qemu_img.output().await.map_err(|e| BackendError::Permanent(format!("cannot run qemu-img: {e}")))?;
    if !output.status.success() {
        return Err(BackendError::Permanent(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Writes the VM's NoCloud seed (an ISO 9660 image labelled `cidata` with `user-data` and
/// `meta-data`) to `iso`, if its spec has cloud-init data; whether it has.
pub async fn make_seed(iso: &Path, runtime: &Runtime) -> Result<bool, BackendError> {
    let spec = &runtime.spec;
    if spec.user_data.is_none() && spec.ssh_authorized_keys.is_none() {
        return Ok(false);
    }
    let dir = iso.with_extension("seed");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("user-data"), spec.user_data.as_deref().unwrap_or("#cloud-config\n"))?;
    std::fs::write(dir.join("meta-data"), meta_data(runtime))?;
    let output = tokio::process::Command::new("genisoimage")
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(iso)
        .arg(dir.join("user-data"))
        .arg(dir.join("meta-data"))
        .output()
        .await
        .map_err(|e| {
            BackendError::Permanent(format!("cannot run genisoimage ({e}): deploy/setup-debian.sh installs it"))
        })?;
    let _ = std::fs::remove_dir_all(&dir);
    if !output.status.success() {
        return Err(BackendError::Permanent(format!(
            "genisoimage failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(true)
}

/// The last `bytes` bytes of a console file; nothing if the guest has printed nothing yet.
pub fn last_bytes(path: &Path, bytes: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let length = file.metadata().map_err(|e| e.to_string())?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(bytes))).map_err(|e| e.to_string())?;
    let mut tail = Vec::with_capacity(bytes.min(length) as usize);
    file.take(bytes).read_to_end(&mut tail).map_err(|e| e.to_string())?;
    Ok(tail)
}

/// NoCloud's meta-data: the instance id (the runtime's), its host name (its name), and the SSH
/// keys cloud-init installs.
fn meta_data(runtime: &Runtime) -> String {
    let mut meta = format!("instance-id: {}\nlocal-hostname: {}\n", runtime.id, runtime.name);
    if let Some(keys) = runtime.spec.ssh_authorized_keys.as_ref().filter(|keys| !keys.is_empty()) {
        meta.push_str("public-keys:\n");
        for key in keys {
            // A YAML double-quoted scalar: the key's own quotes and backslashes escaped.
            meta.push_str(&format!("  - \"{}\"\n", key.replace('\\', "\\\\").replace('"', "\\\"")));
        }
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_imported_whole_or_not_at_all_and_found_by_name() {
        let root = tempfile::tempdir().unwrap();
        let store = VmImageStore::new(root.path().join("images"));
        let source = root.path().join("guest");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("cmdline"), "console=ttyS0\n").unwrap();
        let source_text = source.to_str().unwrap();
        let refused = store.import("guest", source_text).unwrap_err();
        assert!(refused.contains("neither disk.qcow2 nor a kernel"), "{refused}");
        assert!(!store.dir().join("guest").exists(), "nothing half-made is left");
        for part in ["kernel", "initrd"] {
            std::fs::write(source.join(part), part).unwrap();
        }
        let said = store.import("guest", source_text).unwrap();
        assert!(said.contains("kernel, initrd, cmdline"), "{said}");
        let image = store.image("guest").unwrap();
        let boot = image.kernel.expect("booted by its kernel");
        assert_eq!((boot.cmdline.as_str(), image.disk), ("console=ttyS0", None));
        assert!(store.import("guest", source_text).unwrap_err().contains("imported already"));
        assert!(store.import("../escape", source_text).unwrap_err().contains("[a-z0-9._-]"));
        let missing = store.image("nothing").unwrap_err().to_string();
        assert!(missing.contains("runtimeai vm-image import nothing"), "{missing}");
        assert!(store.image("..").is_err());
    }

    /// Serves `body` at `/disk.raw` (and 404 elsewhere) to two HTTP requests; its port.
    fn serve_twice(body: Vec<u8>) -> u16 {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().take(2).flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                while reader.read_line(&mut String::new()).map(|n| n > 2).unwrap_or(false) {}
                if request.starts_with("GET /disk.raw ") {
                    let head =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body)).unwrap();
                } else {
                    stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .unwrap();
                }
            }
        });
        port
    }

    #[test]
    fn a_disk_is_imported_from_a_url_as_qcow2() {
        if std::process::Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("skipped: no qemu-img here");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let store = VmImageStore::new(root.path().join("images"));
        let port = serve_twice(vec![0u8; 1 << 20]);
        let missing = store.import("web", &format!("http://127.0.0.1:{port}/nothing.raw")).unwrap_err();
        assert!(missing.contains("404"), "{missing}");
        let said = store.import("web", &format!("http://127.0.0.1:{port}/disk.raw")).unwrap();
        assert!(said.contains("disk.qcow2 from http://"), "{said}");
        let disk = store.image("web").unwrap().disk.expect("a disk");
        let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&disk).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(1 << 20)), "{info}");
        let kept: Vec<_> =
            std::fs::read_dir(store.dir().join("web")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(kept, ["disk.qcow2"], "the download does not stay");
    }

    #[test]
    fn a_disk_that_names_a_backing_file_of_the_node_is_refused() {
        if std::process::Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("skipped: no qemu-img here");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join("host-secret");
        std::fs::write(&secret, "the node's").unwrap();
        let crafted = root.path().join("crafted.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&crafted)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        let store = VmImageStore::new(root.path().join("images"));
        let refused = store.import("evil", crafted.to_str().unwrap()).unwrap_err();
        assert!(refused.contains("names a backing file"), "{refused}");
        let dir = root.path().join("evil-dir");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&crafted, dir.join("disk.qcow2")).unwrap();
        let refused = store.import("evil", dir.to_str().unwrap()).unwrap_err();
        assert!(refused.contains("names a backing file"), "{refused}");
        assert!(!store.dir().join("evil").exists());
    }

    #[test]
    fn meta_data_names_the_instance_and_quotes_its_keys() {
        let mut runtime = Runtime::new("rt_1", "web", runtimeai_model::RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        runtime.spec.ssh_authorized_keys = Some(vec!["ssh-ed25519 AAAA \"me\"".into()]);
        let meta = meta_data(&runtime);
        assert!(meta.starts_with("instance-id: rt_1\nlocal-hostname: web\npublic-keys:\n"), "{meta}");
        assert!(meta.contains("  - \"ssh-ed25519 AAAA \\\"me\\\"\"\n"), "{meta}");
    }
}
