//! `runtimeai certs`: the certificates a cluster runs with, made with rcgen. A CA; for each
//! member one certificate that serves both its ports and dials its peers (its hosts as SANs, its
//! member id as the URI SAN `urn:runtimeai:member:<id>`); client certificates whose common name
//! is the principal.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make the cluster's CA: <dir>/ca.pem and <dir>/ca-key.pem (refuses to overwrite them).
    Ca {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// How long it is valid, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make member <id>'s certificate, signed by the CA in <dir>: <out>/node-<id>.pem and
    /// <out>/node-<id>-key.pem. Give it to --tls-cert/--tls-key and --peer-cert/--peer-key.
    Node {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where to write it [default: <dir>].
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        id: u64,
        /// The names and addresses clients and peers reach it by, comma-separated
        /// (e.g. `db1.example.com,10.0.0.5`).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a client certificate for principal <name>, signed by the CA in <dir>:
    /// <out>/client-<name>.pem and <out>/client-<name>-key.pem.
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where to write it [default: <dir>].
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Ca { dir, days } => make_ca(&dir, days),
        CertsCommand::Node { dir, out, id, hosts, days } => make_node(&dir, out.as_deref(), id, &hosts, days),
        CertsCommand::Client { dir, out, name, days } => {
            anyhow::ensure!(!name.is_empty(), "--name must not be empty");
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name.clone());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            issue(&dir, out.as_deref(), &format!("client-{name}"), params, days)
        }
    }
}

/// Member `id`'s certificate for `hosts`, signed by the CA in `dir`, written to `out`.
pub fn make_node(dir: &Path, out: Option<&Path>, id: u64, hosts: &[String], days: u32) -> anyhow::Result<()> {
    anyhow::ensure!(id > 0, "--id must be a positive integer");
    anyhow::ensure!(!hosts.is_empty(), "--hosts needs at least one name or address");
    let mut params = CertificateParams::new(hosts.to_vec()).context("invalid --hosts")?;
    params.distinguished_name.push(DnType::CommonName, format!("runtimeai member {id}"));
    let uri = runtimeai_raft::tls::member_uri(id);
    params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().context("member URI")?));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, out, &format!("node-{id}"), params, days)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.max(1) as i64);
}

/// The cluster's CA in `dir` (`ca.pem`, `ca-key.pem`); refuses to overwrite one.
pub fn make_ca(dir: &Path, days: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "runtimeai cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write_new(&dir.join("ca-key.pem"), &key.serialize_pem(), true)?;
    write_new(&dir.join("ca.pem"), &cert.pem(), false)?;
    println!(
        "made {}/ca.pem and {}/ca-key.pem (keep the key offline once the members have their certificates)",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// Signs `params` with the CA in `dir` and writes `<out>/<name>.pem` and `<out>/<name>-key.pem`
/// (replacing earlier ones: that is how a certificate is rotated).
fn issue(dir: &Path, out: Option<&Path>, name: &str, mut params: CertificateParams, days: u32) -> anyhow::Result<()> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (make the CA first: runtimeai certs ca)", path.display()))
    };
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?).context("ca-key.pem holds no key")?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).context("ca.pem holds no CA certificate")?;
    validity(&mut params, days);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let out = out.unwrap_or(dir);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (cert_path, key_path) = (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")));
    replace(&key_path, &key.serialize_pem(), true)?;
    replace(&cert_path, &cert.pem(), false)?;
    println!("made {} and {}", cert_path.display(), key_path.display());
    Ok(())
}

fn open_options(private: bool) -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(if private { 0o600 } else { 0o644 });
    options
}

fn write_new(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = open_options(private)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {} (it exists already?)", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a whole new file beside `path` and renames it over `path`: a node that reloads
/// never reads half a certificate.
fn replace(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    let temporary = path.with_extension("pem.new");
    let _ = std::fs::remove_file(&temporary);
    write_new(&temporary, text, private)?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))
}
