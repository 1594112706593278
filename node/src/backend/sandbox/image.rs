//! The images sandboxes start from, unpacked once into the node's image store
//! (`<sandbox-dir>/images/<name>/rootfs`) and shared read-only: each sandbox writes to a layer
//! of its own above it ([`super::layer`]). Files belong to the node's id range, so the
//! sandbox's root owns them as root inside and nobody does outside.
//!
//! The default image, `busybox`, is made here from the node's statically linked BusyBox (Debian's
//! `busybox-static`, installed by `deploy/setup-debian.sh`): a shell and the usual tools, nothing
//! else. Its name carries the digest of that binary, so a new BusyBox makes a new image.
//!
//! The `python` image, for agents, is BusyBox's tools with the node's Python 3: its interpreter,
//! its standard library (without its tests) and every shared library they link, found by `ldd`,
//! each at the path the loader looks for it. Its name carries the interpreter's digest.
//!
//! Any other image is pulled from its registry by `skopeo` into the store's OCI layout (skopeo
//! checks every blob against its digest), tagged there by the reference, and unpacked by
//! `umoci` with its ids mapped into the node's range, once per manifest digest. A registry
//! reached without TLS must be named in `--insecure-registry` (logged when the node starts).

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::bundle::IdRange;
use super::Tools;
use crate::backend::BackendError;

/// The image a sandbox starts from when its spec names none.
pub const DEFAULT_IMAGE: &str = "busybox";
/// The image with Python 3 for agents, made on the node.
pub const PYTHON_IMAGE: &str = "python";

#[derive(Debug)]
pub(super) struct ImageStore {
    root: PathBuf,
    ids: IdRange,
    /// Registries (`host:port`) reached over plain HTTP.
    insecure: Vec<String>,
    /// One pull or unpack at a time: they write the same layout.
    busy: std::sync::Mutex<()>,
}

impl ImageStore {
    pub(super) fn new(root: PathBuf, ids: IdRange, insecure: Vec<String>) -> ImageStore {
        ImageStore { root, ids, insecure, busy: std::sync::Mutex::new(()) }
    }

    /// The root file system of `reference` (the default image if `None`), pulled and unpacked
    /// if this node does not have it yet. Blocking: it may download.
    pub(super) fn rootfs(&self, tools: &Tools, reference: Option<&str>) -> Result<PathBuf, BackendError> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::fs::create_dir_all(&self.root)?;
        match reference {
            None | Some(DEFAULT_IMAGE) => self.default_rootfs(tools),
            Some(PYTHON_IMAGE) => self.python_rootfs(tools),
            Some(reference) => self.pulled_rootfs(tools, reference),
        }
    }

    fn pulled_rootfs(&self, tools: &Tools, reference: &str) -> Result<PathBuf, BackendError> {
        let layout = self.root.join("layout");
        // An OCI tag is [A-Za-z0-9_.-]: the reference's digest names it.
        let tag = hex::encode(&Sha256::digest(reference.as_bytes())[..16]);
        let image = format!("{}:{tag}", layout.display());
        if manifest_digest(&layout, &tag).is_none() {
            let registry = reference.split('/').next().unwrap_or_default();
            let tls = format!("--src-tls-verify={}", !self.insecure.iter().any(|r| r == registry));
            let source = format!("docker://{reference}");
            let destination = format!("oci:{image}");
            super::layer::run(
                &tools.skopeo,
                &["copy".as_ref(), "--quiet".as_ref(), tls.as_ref(), source.as_ref(), destination.as_ref()],
            )
            .map_err(|e| BackendError::Permanent(format!("cannot pull image {reference}: {e}")))?;
        }
        let digest = manifest_digest(&layout, &tag)
            .ok_or_else(|| BackendError::Retryable(format!("image {reference} is not in the layout after its pull")))?;
        let unpacked = self.root.join(digest.replace(':', "-"));
        let rootfs = unpacked.join("rootfs");
        if rootfs.exists() {
            return Ok(rootfs);
        }
        let partial = self.root.join(format!(".{}.partial", digest.replace(':', "-")));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        let map = format!("0:{}:{}", self.ids.base, self.ids.size);
        let args = ["unpack", "--uid-map", &map, "--gid-map", &map, "--image", &image];
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        args.push(partial.as_os_str());
        super::layer::run(&tools.umoci, &args)
            .map_err(|e| BackendError::Permanent(format!("cannot unpack image {reference}: {e}")))?;
        std::fs::rename(&partial, &unpacked)?;
        Ok(rootfs)
    }

    /// The root file system of the default image, made on first use.
    fn default_rootfs(&self, tools: &Tools) -> Result<PathBuf, BackendError> {
        let busybox = std::fs::read(&tools.busybox)?;
        self.made_rootfs("busybox", &busybox, |rootfs| {
            self.make_busybox(tools, &busybox, rootfs)?;
            chown_tree(rootfs, self.ids.base)
        })
    }

    /// The root file system of the `python` image, made on first use.
    fn python_rootfs(&self, tools: &Tools) -> Result<PathBuf, BackendError> {
        let (Some(python), Some(ldd)) = (&tools.python3, &tools.ldd) else {
            return Err(BackendError::Permanent(
                "this node has no python3 (and ldd) in /usr/bin to make the python image from".into(),
            ));
        };
        let python = python.canonicalize()?;
        let busybox = std::fs::read(&tools.busybox)?;
        let interpreter = std::fs::read(&python)?;
        self.made_rootfs("python", &[&interpreter[..], &busybox].concat(), |rootfs| {
            self.make_busybox(tools, &busybox, rootfs)?;
            add_python(&python, ldd, rootfs)?;
            chown_tree(rootfs, self.ids.base)
        })
    }

    /// The root file system of the image `name` made from `source` (its digest names the image),
    /// made by `make` into a partial directory first, so that a crash leaves no half image.
    fn made_rootfs(
        &self,
        name: &str,
        source: &[u8],
        make: impl FnOnce(&Path) -> Result<(), BackendError>,
    ) -> Result<PathBuf, BackendError> {
        let digest = hex::encode(&Sha256::digest(source)[..12]);
        let image = self.root.join(format!("{name}-{digest}"));
        let rootfs = image.join("rootfs");
        if rootfs.exists() {
            return Ok(rootfs);
        }
        let partial = self.root.join(format!(".{name}-{digest}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        make(&partial)?;
        std::fs::create_dir_all(&image)?;
        std::fs::rename(&partial, &rootfs)?;
        Ok(rootfs)
    }

    fn make_busybox(&self, tools: &Tools, busybox: &[u8], rootfs: &Path) -> Result<(), BackendError> {
        for dir in ["bin", "etc", "tmp", "root", "proc", "dev", "sys", "var/tmp", "usr/bin", "usr/sbin", "sbin"] {
            std::fs::create_dir_all(rootfs.join(dir))?;
        }
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        std::fs::set_permissions(rootfs.join("var/tmp"), std::fs::Permissions::from_mode(0o1777))?;
        std::fs::set_permissions(rootfs.join("root"), std::fs::Permissions::from_mode(0o700))?;
        let binary = rootfs.join("bin/busybox");
        std::fs::write(&binary, busybox)?;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
        let list = std::process::Command::new(&tools.busybox)
            .arg("--list")
            .env_clear()
            .output()
            .map_err(|e| BackendError::Permanent(format!("cannot run {}: {e}", tools.busybox.display())))?;
        for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
            if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                symlink("busybox", rootfs.join("bin").join(applet))?;
            }
        }
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
        std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
        Ok(())
    }
}

/// The digest of the manifest `tag` names in the OCI layout at `layout`, if it has one.
fn manifest_digest(layout: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"].as_array()?.iter().find_map(|manifest| {
        let named = manifest["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag);
        named.then(|| manifest["digest"].as_str().map(str::to_string)).flatten()
    })
}

/// Gives every file below `root` (symbolic links themselves, not what they point to) to `id`.
fn chown_tree(root: &Path, id: u32) -> Result<(), BackendError> {
    std::os::unix::fs::lchown(root, Some(id), Some(id))?;
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            chown_tree(&path, id)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(id), Some(id))?;
        }
    }
    Ok(())
}

/// Copies the interpreter `python` (as `python3` and `python` too), its standard library without
/// its tests, and every shared library those link into `rootfs`, each at its path on the node.
fn add_python(python: &Path, ldd: &Path, rootfs: &Path) -> Result<(), BackendError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| BackendError::Permanent(format!("python image: {what}: {e}"));
    let asked = std::process::Command::new(python)
        .args(["-I", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .env_clear()
        .output()
        .map_err(|e| failed("cannot ask python3 where its library is", &e))?;
    let stdlib = PathBuf::from(String::from_utf8_lossy(&asked.stdout).trim());
    if !asked.status.success() || !stdlib.is_absolute() {
        return Err(failed("python3 named no library", &String::from_utf8_lossy(&asked.stderr)));
    }
    let inside = |path: &Path| rootfs.join(path.strip_prefix("/").unwrap_or(path));
    let mut linked = vec![python.to_path_buf()];
    copy_tree(&stdlib, &inside(&stdlib), &mut linked)?;
    std::fs::create_dir_all(inside(python).parent().unwrap_or(rootfs))?;
    std::fs::copy(python, inside(python))?;
    for alias in ["usr/bin/python3", "usr/bin/python"] {
        if !rootfs.join(alias).exists() {
            symlink(python, rootfs.join(alias))?;
        }
    }
    let mut libraries = std::collections::BTreeSet::new();
    for object in &linked {
        let listed = std::process::Command::new(ldd)
            .arg(object)
            .env_clear()
            .output()
            .map_err(|e| failed("cannot run ldd", &e))?;
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last().unwrap_or_default().trim().split(" (").next().unwrap_or_default();
            if path.starts_with('/') {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    for library in libraries {
        let target = inside(&library);
        std::fs::create_dir_all(target.parent().unwrap_or(rootfs))?;
        // The file itself, not a link to it: the loader finds it by the name it was listed by.
        std::fs::copy(&library, &target)?;
    }
    Ok(())
}

/// Copies the directory `from` to `to` (files, directories and links; not `test` directories or
/// `__pycache__`), listing each shared object copied in `shared`.
fn copy_tree(from: &Path, to: &Path, shared: &mut Vec<PathBuf>) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "test" || name == "tests" || name == "__pycache__" || name == "idlelib" || name == "tkinter" {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_dir() {
            copy_tree(&source, &target, shared)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
            if source.extension().is_some_and(|e| e == "so") {
                shared.push(source);
            }
        }
    }
    Ok(())
}
