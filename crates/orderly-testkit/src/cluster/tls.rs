//! A throwaway certificate authority and server certificate for a cluster started with
//! [`ClusterSpec::tls`]: made with the `openssl` command-line tool in the cluster directory,
//! valid for `127.0.0.1` and `localhost`, so clients can verify the full identity
//! (`ssl-mode=VERIFY_IDENTITY`, `rediss://`) against the CA file.

use super::*;

/// The PEM files of a cluster's TLS setup.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The servers' certificate (signed by the CA) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Creates a CA and a server certificate under `dir/tls` (P-256 keys: fast to make).
    pub(super) fn create(dir: &Path) -> Result<TlsFiles, ClusterError> {
        let dir = dir.join("tls");
        fs::create_dir(&dir).map_err(|e| ClusterError::io(format!("creating {}", dir.display()), e))?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        };
        let ca_key = dir.join("ca-key.pem");
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(|e| ClusterError::io(format!("writing {}", ext.display()), e))?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(&dir, |c| {
            c.args(["req", "-x509"])
                .args(ec)
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&files.ca)
                .args(["-days", "7", "-subj", "/CN=orderly test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        })?;
        openssl(&dir, |c| {
            c.arg("req")
                .args(ec)
                .arg("-keyout")
                .arg(&files.key)
                .arg("-out")
                .arg(&csr)
                .args(["-subj", "/CN=localhost"]);
        })?;
        openssl(&dir, |c| {
            c.args(["x509", "-req", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&files.ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .args(["-CAcreateserial", "-days", "7", "-out"])
                .arg(&files.cert)
                .arg("-extfile")
                .arg(&ext);
        })?;
        Ok(files)
    }
}

/// Runs `openssl` with the arguments `args` adds, in `dir`.
fn openssl(dir: &Path, args: impl FnOnce(&mut Command)) -> Result<(), ClusterError> {
    let mut command = Command::new("openssl");
    command.current_dir(dir);
    args(&mut command);
    let out = command
        .output()
        .map_err(|e| ClusterError::io("running openssl (apt-get install openssl)", e))?;
    if !out.status.success() {
        return Err(ClusterError::io(
            format!("openssl {:?}", command.get_args().collect::<Vec<_>>()),
            io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        ));
    }
    Ok(())
}
