//! Azure Blob Storage containers: the `az://` URL, the client, creating the
//! container, and Delete Blob with `If-Match`.
//!
//! `object_store`'s Azure signer makes service SAS URLs, which cannot bind
//! a request header (it refuses `SignedUrlOptions` headers). The delete
//! and the container creation are therefore built here and authorized by
//! `object_store`'s own [`AzureAuthorizer`] with the store's own
//! credential: Shared Key (the `If-Match` value is part of the signed
//! string), a bearer token, or the user's SAS token.

use std::sync::Arc;

use ::object_store::ClientConfigKey;
use ::object_store::azure::{
    AzureAuthorizer, AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder,
};
use ::object_store::client::HttpRequestBody;
use ::object_store::path::Path as ObjectPath;
use async_trait::async_trait;
use reqwest::header::{CONTENT_LENGTH, IF_MATCH};
use reqwest::{Method, StatusCode};

use super::Connected;
use super::client::EtagStyle;
use super::config::{READ_RETRIES, UrlForm, UrlParts, millis, parse_url, retry_config};
use super::requests::{Requests, http_client, send, unsigned};
use crate::error::{Error, ErrorKind, Result};

const FORM: UrlForm = UrlForm {
    scheme: "az",
    backend: "azure",
    bucket_word: "container",
    form: "az://CONTAINER[/PREFIX][?timeout_ms=N&endpoint=URL&account=NAME&allow_http=true]",
    credentials_hint: "set AZURE_STORAGE_ACCOUNT_KEY (or another AZURE_* credential)",
    params: &["account"],
};

/// How to reach an Azure Blob Storage container: what an `az://` URL says
/// (see [`ObjectStoreStorage`](super::ObjectStoreStorage) for its form),
/// plus an account key given in code. Everything left unset comes from the
/// usual `AZURE_*` environment variables.
///
/// `Debug` never shows the key.
///
/// ```
/// use metadatacache::AzureConfig;
/// // Azurite: the account is the endpoint's path.
/// let config = AzureConfig::from_url(
///     "az://app/meta?endpoint=http://127.0.0.1:10000/devstoreaccount1&allow_http=true",
/// )?
/// .access_key("c2VjcmV0LWV4YW1wbGU=");
/// assert_eq!(config.account(), Some("devstoreaccount1"));
/// assert!(!format!("{config:?}").contains("c2VjcmV0"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AzureConfig {
    pub(super) parts: UrlParts,
    account: Option<String>,
    access_key: Option<String>,
}

impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("container", &self.parts.bucket)
            .field("prefix", &self.parts.prefix)
            .field("timeout", &self.parts.timeout)
            .field("endpoint", &self.parts.endpoint)
            .field("account", &self.account)
            .field("allow_http", &self.parts.allow_http)
            .field("access_key", &self.access_key.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl AzureConfig {
    /// Reads an `az://` URL. The account is `account=`, else the path of a
    /// path-style `endpoint` (`http://HOST:PORT/ACCOUNT`, as Azurite
    /// serves), else `AZURE_STORAGE_ACCOUNT_NAME`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL and what is wrong with it.
    pub fn from_url(url: &str) -> Result<AzureConfig> {
        let parts = parse_url(url, &FORM)?;
        let name = &parts.bucket;
        let valid = (3..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--");
        if !valid {
            return Err(FORM.bad(
                url,
                "a container name is 3 to 63 lowercase letters, digits and single hyphens",
            ));
        }
        let from_endpoint = parts.endpoint.as_deref().and_then(|ep| {
            let ep = url::Url::parse(ep).ok()?;
            let mut segments = ep.path_segments()?.filter(|s| !s.is_empty());
            let account = segments.next()?.to_owned();
            segments.next().is_none().then_some(account)
        });
        let account = parts.param("account").map(str::to_owned).or(from_endpoint);
        Ok(AzureConfig {
            parts,
            account,
            access_key: None,
        })
    }

    /// Uses this storage account key (base64, as the portal shows it)
    /// instead of `AZURE_STORAGE_ACCOUNT_KEY`.
    #[must_use]
    pub fn access_key(mut self, key: impl Into<String>) -> Self {
        self.access_key = Some(key.into());
        self
    }

    /// The container.
    pub fn container(&self) -> &str {
        &self.parts.bucket
    }

    /// The key prefix ("" for none).
    pub fn prefix(&self) -> &str {
        &self.parts.prefix
    }

    /// The storage account the URL names (else it comes from
    /// `AZURE_STORAGE_ACCOUNT_NAME`).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    fn builder(&self, retries: usize) -> MicrosoftAzureBuilder {
        let timeout = self.parts.timeout;
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_container_name(&self.parts.bucket)
            .with_config(
                AzureConfigKey::Client(ClientConfigKey::Timeout),
                millis(timeout),
            )
            .with_config(
                AzureConfigKey::Client(ClientConfigKey::ConnectTimeout),
                millis(timeout),
            )
            .with_retry(retry_config(timeout, retries));
        if let Some(endpoint) = &self.parts.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Some(account) = &self.account {
            builder = builder.with_account(account);
        }
        if let Some(allow) = self.parts.allow_http {
            builder = builder.with_allow_http(allow);
        }
        if let Some(key) = &self.access_key {
            builder = builder.with_access_key(key);
        }
        builder
    }

    fn build(&self, retries: usize) -> Result<MicrosoftAzure> {
        self.builder(retries).build().map_err(|e| {
            FORM.bad(
                &self.parts.url,
                "cannot configure the Azure client (the account comes from account=, a \
                 path-style endpoint or AZURE_STORAGE_ACCOUNT_NAME)",
            )
            .with_source(e)
        })
    }

    /// The container's URL, exactly as `object_store` builds its blobs'
    /// URLs from the same settings.
    fn container_url(&self) -> Result<(String, url::Url)> {
        let builder = self.builder(0);
        let value = |key| builder.get_config_value(&key);
        let flag = |key| value(key).is_some_and(|v| matches!(v.as_str(), "true" | "1"));
        let emulator = flag(AzureConfigKey::UseEmulator);
        let account = value(AzureConfigKey::AccountName)
            .or_else(|| emulator.then(|| "devstoreaccount1".to_owned()))
            .ok_or_else(|| FORM.bad(&self.parts.url, "no storage account"))?;
        let base = if emulator {
            let base = std::env::var("AZURITE_BLOB_STORAGE_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:10000".to_owned());
            format!("{}/{account}", base.trim_end_matches('/'))
        } else if let Some(endpoint) = value(AzureConfigKey::Endpoint) {
            endpoint
        } else if flag(AzureConfigKey::UseFabricEndpoint) {
            format!("https://{account}.blob.fabric.microsoft.com")
        } else {
            format!("https://{account}.blob.core.windows.net")
        };
        let mut url = url::Url::parse(&base).map_err(|e| {
            FORM.bad(&self.parts.url, "the endpoint is not a URL")
                .with_source(e)
        })?;
        url.path_segments_mut()
            .map_err(|()| FORM.bad(&self.parts.url, "the endpoint cannot have a path"))?
            .pop_if_empty()
            .push(&self.parts.bucket);
        Ok((account, url))
    }

    /// The read store (a few retries), the write store (none, see
    /// [`S3Config`](super::S3Config)), and the requests authorized with the
    /// write store's credential.
    pub(super) fn connect(&self) -> Result<Connected> {
        let write = Arc::new(self.build(0)?);
        let (account, container_url) = self.container_url()?;
        let requests = AzureRequests {
            store: Arc::clone(&write),
            account,
            container: self.parts.bucket.clone(),
            container_url,
            http: http_client(self.parts.timeout)?,
        };
        let read = Arc::new(self.build(READ_RETRIES)?);
        Ok(Connected {
            read: read.clone(),
            pages: read,
            write,
            requests: Arc::new(requests),
            etags: EtagStyle::QuotedETag,
        })
    }
}

/// Delete Blob with `If-Match` and Create Container, authorized with the
/// store's credential.
#[derive(Debug)]
struct AzureRequests {
    store: Arc<MicrosoftAzure>,
    account: String,
    container: String,
    container_url: url::Url,
    http: reqwest::Client,
}

impl AzureRequests {
    /// Authorizes `method url` with `headers` and sends it.
    async fn send(
        &self,
        method: Method,
        url: url::Url,
        headers: &[(reqwest::header::HeaderName, &str)],
        what: &str,
    ) -> Result<super::requests::Answer> {
        let mut request = http::Request::builder().method(method).uri(url.as_str());
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let mut request = request
            .body(HttpRequestBody::empty())
            .map_err(|e| Error::invalid_input(format!("cannot build the {what}")).with_source(e))?;
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| unsigned(what, e))?;
        AzureAuthorizer::new(&credential, &self.account)
            .try_authorize(&mut request)
            .map_err(|e| unsigned(what, e))?;
        let (parts, _) = request.into_parts();
        let url = url::Url::parse(&parts.uri.to_string()).map_err(|e| {
            Error::new(ErrorKind::Other, format!("cannot build the {what}")).with_source(e)
        })?;
        let builder = self.http.request(parts.method, url).headers(parts.headers);
        send(builder, what).await
    }
}

#[async_trait]
impl Requests for AzureRequests {
    fn bucket(&self) -> (&'static str, Option<&str>) {
        ("container", Some(&self.container))
    }

    async fn delete_if_match(&self, key: &ObjectPath, etag: &str) -> Result<()> {
        const WHAT: &str = "conditional delete";
        let mut url = self.container_url.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(key.parts());
        }
        let answer = self
            .send(Method::DELETE, url, &[(IF_MATCH, etag)], WHAT)
            .await?;
        if answer.is_success() {
            Ok(())
        } else {
            Err(answer.refused(WHAT))
        }
    }

    async fn create_bucket(&self) -> Result<()> {
        const WHAT: &str = "create container";
        let mut url = self.container_url.clone();
        url.query_pairs_mut().append_pair("restype", "container");
        let answer = self
            .send(Method::PUT, url, &[(CONTENT_LENGTH, "0")], WHAT)
            .await?;
        if answer.is_success()
            || (answer.status == StatusCode::CONFLICT
                && answer.body.contains("ContainerAlreadyExists"))
        {
            Ok(())
        } else {
            Err(answer.refused(WHAT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::util::redact_url;

    #[test]
    fn parses() {
        let c = AzureConfig::from_url(
            "az://box/a/b%20c?endpoint=http://127.0.0.1:1/devstoreaccount1/&allow_http=true\
             &timeout_ms=700",
        )
        .unwrap();
        assert_eq!((c.container(), c.prefix()), ("box", "a/b c"));
        assert_eq!(c.account(), Some("devstoreaccount1"));
        assert_eq!(c.parts.timeout, std::time::Duration::from_millis(700));
        let c = AzureConfig::from_url("az://box?account=acct").unwrap();
        assert_eq!((c.account(), c.prefix()), (Some("acct"), ""));
        let c = AzureConfig::from_url("az://box?endpoint=https://blob.example.net").unwrap();
        assert_eq!(c.account(), None);
    }

    #[test]
    fn rejects() {
        for bad in [
            "az://",
            "az:///prefix",
            "az://Upper/x",
            "az://ab/x",
            "az://a--b/x",
            "az://-ab/x",
            "az://box/x?region=r",
            "az://box/x?endpoint=http://h/acct",
            "az://box/x?endpoint=https://h/?sig=1",
            "az://acct:secret@box/x",
            "az://box:10000/x",
            "az://box/a//x",
            "s3://box/x",
        ] {
            let e = AzureConfig::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert_eq!(e.backend(), Some("azure"), "{bad}");
            assert!(e.to_string().contains(&redact_url(bad)), "{e} names {bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
