//! Passthrough plumbing: a macro that re-serves a unary (or server-streaming) RPC by calling
//! the same method on a member, with the caller's metadata and the upstream retry rule.

/// Messages bigger than etcd's limits are refused by the members, not by the proxy's client.
pub(crate) const UPSTREAM_DECODE_BYTES_MAX: usize = 2 * 1024 * 1024 * 1024 - 1;

/// `unary!(method, Request, Response, Client, Retry)` inside an `#[async_trait] impl Service
/// for X` whose `self.upstream` is the member set: calls `Client::method` on a member and
/// relays the answer. (Written in the boxed-future form `#[async_trait]` produces, because the
/// attribute runs before macros expand.)
macro_rules! unary {
    ($method:ident, $req:ty, $resp:ty, $client:ident, $retry:expr) => {
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: tonic::Request<$req>,
        ) -> ::std::pin::Pin<
            Box<
                dyn ::std::future::Future<Output = Result<tonic::Response<$resp>, tonic::Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let (meta, _, message) = request.into_parts();
                let answer = self
                    .upstream
                    .call($retry, |channel| {
                        let req = $crate::upstream::forward(&meta, message.clone());
                        async move {
                            $client::new(channel)
                                .max_decoding_message_size(
                                    $crate::forward::UPSTREAM_DECODE_BYTES_MAX,
                                )
                                .$method(req)
                                .await
                                .map(tonic::Response::into_inner)
                        }
                    })
                    .await?;
                Ok(tonic::Response::new(answer))
            })
        }
    };
}

/// `server_stream!(method, Request, Response, Client)`: relays a server-streaming RPC (the
/// stream is opened on a member with the immutable retry rule, then relayed as is).
macro_rules! server_stream {
    ($method:ident, $req:ty, $resp:ty, $client:ident) => {
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: tonic::Request<$req>,
        ) -> ::std::pin::Pin<
            Box<
                dyn ::std::future::Future<
                        Output = Result<
                            tonic::Response<tonic::codegen::BoxStream<$resp>>,
                            tonic::Status,
                        >,
                    > + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let (meta, _, message) = request.into_parts();
                let stream = self
                    .upstream
                    .call($crate::upstream::Retry::Immutable, |channel| {
                        let req = $crate::upstream::forward(&meta, message.clone());
                        async move {
                            $client::new(channel)
                                .max_decoding_message_size(
                                    $crate::forward::UPSTREAM_DECODE_BYTES_MAX,
                                )
                                .$method(req)
                                .await
                                .map(tonic::Response::into_inner)
                        }
                    })
                    .await?;
                let stream: tonic::codegen::BoxStream<$resp> = Box::pin(stream);
                Ok(tonic::Response::new(stream))
            })
        }
    };
}

pub(crate) use {server_stream, unary};
