//! `--resolver-prefix P --resolver-ttl T`: the proxy registers itself under
//! `P/<advertise-client-url>` on a lease of T seconds, in etcd's naming format
//! (`{"Op":0,"Addr":"<url>","Metadata":"{\"name\":\"<host>\"}"}`), keeps the lease alive and
//! registers again if it is lost. MemberList through any proxy of that prefix lists them all,
//! so clients that sync their endpoints spread over the proxies.

use std::sync::Arc;
use std::time::Duration;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::kv_client::KvClient;
use keyhold_proto::etcdserverpb::lease_client::LeaseClient;
use tokio_stream::StreamExt;
use tonic::{Request, Response};

use crate::upstream::{Retry, Upstream};

/// Delay between registration attempts after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// The registration key of `url` under `prefix`.
pub fn key(prefix: &str, url: &str) -> String {
    format!("{prefix}/{url}")
}

/// The registration value (etcd's `naming/endpoints` JSON; Metadata is a JSON string).
pub fn value(url: &str, name: &str) -> String {
    let metadata = serde_json::json!({ "name": name }).to_string();
    serde_json::json!({ "Op": 0, "Addr": url, "Metadata": metadata }).to_string()
}

/// `(name, url)` of a registration value, if it parses.
pub fn parse(value: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let url = v["Addr"].as_str()?.to_string();
    let name = v["Metadata"]
        .as_str()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|m| m["name"].as_str().map(str::to_string))
        .unwrap_or_default();
    Some((name, url))
}

/// Registers and keeps the registration alive until `stop` fires.
pub async fn run(
    upstream: Arc<Upstream>,
    prefix: String,
    ttl: i64,
    url: String,
    name: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = register_once(&upstream, &prefix, ttl, &url, &name) => {
                tracing::warn!(error = %r, "proxy registration lost; registering again");
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One registration: grant, put, keep alive at a third of the TTL; returns why it ended.
async fn register_once(
    upstream: &Upstream,
    prefix: &str,
    ttl: i64,
    url: &str,
    name: &str,
) -> String {
    let grant = upstream
        .call(Retry::Mutable, |channel| async move {
            let req = Request::new(pb::LeaseGrantRequest { ttl, id: 0 });
            LeaseClient::new(channel)
                .lease_grant(req)
                .await
                .map(Response::into_inner)
        })
        .await;
    let lease = match grant {
        Ok(g) => g.id,
        Err(e) => return format!("lease grant: {e}"),
    };
    let put = pb::PutRequest {
        key: key(prefix, url).into_bytes(),
        value: value(url, name).into_bytes(),
        lease,
        ..Default::default()
    };
    let put = upstream
        .call(Retry::Mutable, |channel| {
            let req = Request::new(put.clone());
            async move { KvClient::new(channel).put(req).await.map(|_| ()) }
        })
        .await;
    if let Err(e) = put {
        return format!("put: {e}");
    }
    tracing::info!(prefix, url, lease, "proxy registered");
    let (member, channel) = upstream.pick();
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(100));
    let requests = StreamExt::map(
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every)),
        move |_| pb::LeaseKeepAliveRequest { id: lease },
    );
    let mut answers = match LeaseClient::new(channel).lease_keep_alive(requests).await {
        Ok(a) => a.into_inner(),
        Err(e) => return format!("keepalive: {e}"),
    };
    loop {
        tokio::select! {
            a = answers.next() => match a {
                Some(Ok(a)) if a.ttl > 0 => {}
                Some(Ok(_)) => return "lease expired".into(),
                Some(Err(e)) => return format!("keepalive: {e}"),
                None => return "keepalive stream ended".into(),
            },
            () = upstream.unhealthy(member) => return "member failed its health check".into(),
        }
    }
}

/// Every registered proxy under `prefix`: `(name, url)`.
pub async fn list(
    upstream: &Upstream,
    prefix: &str,
) -> Result<Vec<(String, String)>, tonic::Status> {
    let start = format!("{prefix}/").into_bytes();
    let mut end = start.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let req = pb::RangeRequest {
        key: start,
        range_end: end,
        ..Default::default()
    };
    let answer = upstream
        .call(Retry::Immutable, |channel| {
            let r = Request::new(req.clone());
            async move {
                KvClient::new(channel)
                    .range(r)
                    .await
                    .map(Response::into_inner)
            }
        })
        .await
        .map_err(tonic::Status::from)?;
    Ok(answer
        .kvs
        .iter()
        .filter_map(|kv| parse(&kv.value))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_use_etcds_naming_format_and_parse_back() {
        let v = value("http://127.0.0.1:23790", "host-a");
        assert_eq!(
            v,
            r#"{"Addr":"http://127.0.0.1:23790","Metadata":"{\"name\":\"host-a\"}","Op":0}"#
        );
        assert_eq!(
            parse(v.as_bytes()),
            Some(("host-a".to_string(), "http://127.0.0.1:23790".to_string()))
        );
        assert_eq!(key("p", "http://x:1"), "p/http://x:1");
    }
}
