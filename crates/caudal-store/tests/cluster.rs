//! The store's part of a cluster, on every backend: fencing tokens that
//! grow with each change of a lease's hands, checkpoint writes that commit
//! only with the current token, and the node registry.

mod support;

use std::time::Duration;

use caudal_core::ErrorKind;
use caudal_store::{Fence, LeaseOutcome, NewNode, NodeState};
use serde_json::json;
use support::Ctx;

backend_tests!(
    a_lease_token_grows_with_each_new_holder_and_never_goes_back,
    a_fenced_checkpoint_commits_only_with_the_current_token,
    nodes_register_beat_drain_and_stop,
);

const TTL: Duration = Duration::from_secs(60);
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Longer than [`SHORT_TTL`], with room for SQLite's millisecond clock.
const PAST_SHORT_TTL: Duration = Duration::from_millis(1300);
const LEASE: &str = "owner/orders";

async fn token(store: &caudal_store::Store, holder: &str) -> i64 {
    store
        .lease_token(LEASE, holder)
        .await
        .expect("token")
        .unwrap_or_else(|| panic!("{holder} holds {LEASE}"))
}

async fn a_lease_token_grows_with_each_new_holder_and_never_goes_back(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.lease_token(LEASE, "a").await.expect("token"), None);
    assert_eq!(
        store
            .try_acquire_lease(LEASE, "a", TTL)
            .await
            .expect("acquire"),
        LeaseOutcome::Acquired
    );
    let first = token(&store, "a").await;
    // Renewing, and acquiring again while holding, keep the token.
    assert!(store.renew_lease(LEASE, "a", TTL).await.expect("renew"));
    store
        .try_acquire_lease(LEASE, "a", TTL)
        .await
        .expect("acquire again");
    assert_eq!(token(&store, "a").await, first);
    assert_eq!(store.lease_token(LEASE, "b").await.expect("token"), None);

    // Given up: the next holder, even the same one, gets a new token.
    store.expire_lease(LEASE, "a").await.expect("give up");
    assert_eq!(store.lease_token(LEASE, "a").await.expect("token"), None);
    store
        .try_acquire_lease(LEASE, "b", TTL)
        .await
        .expect("acquire b");
    let second = token(&store, "b").await;
    assert!(second > first, "{second} after {first}");
    store.expire_lease(LEASE, "b").await.expect("give up b");
    store
        .try_acquire_lease(LEASE, "b", SHORT_TTL)
        .await
        .expect("acquire b again");
    let third = token(&store, "b").await;
    assert!(third > second, "{third} after {second}");

    // Expired and taken by another: a new token; taken over: another.
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(store.lease_token(LEASE, "b").await.expect("token"), None);
    store
        .try_acquire_lease(LEASE, "c", TTL)
        .await
        .expect("acquire c");
    let fourth = token(&store, "c").await;
    assert!(fourth > third, "{fourth} after {third}");
    assert!(
        store
            .take_over_lease(LEASE, "c", "d", TTL)
            .await
            .expect("take over")
    );
    assert!(token(&store, "d").await > fourth);

    let listed = store.leases("owner/").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].holder, "d");
    assert!(listed[0].held);
    assert!(
        store
            .leases("pipeline/")
            .await
            .expect("list none")
            .is_empty()
    );
    // Released (not given up), the row goes.
    store.release_lease(LEASE, "d").await.expect("release");
    assert!(store.leases("owner/").await.expect("list").is_empty());
}

async fn a_fenced_checkpoint_commits_only_with_the_current_token(ctx: Ctx) {
    let store = ctx.open().await;
    store
        .try_acquire_lease(LEASE, "a", SHORT_TTL)
        .await
        .expect("acquire");
    let old = Fence {
        lease: LEASE.into(),
        holder: "a".into(),
        token: token(&store, "a").await,
    };
    store
        .save_checkpoint_fenced("orders", &json!({"n": 1}), Some(&old))
        .await
        .expect("the owner saves");

    // The lease runs out (a paused node): nothing commits any more, even
    // before anyone else takes it.
    tokio::time::sleep(PAST_SHORT_TTL).await;
    let err = store
        .save_checkpoint_fenced("orders", &json!({"n": 2}), Some(&old))
        .await
        .expect_err("an expired fence");
    assert_eq!(err.kind(), ErrorKind::Busy, "{:?}: {err}", ctx.backend);

    // A new owner moves on; the old one, back, cannot move it back.
    store
        .try_acquire_lease(LEASE, "b", TTL)
        .await
        .expect("b takes over");
    let new = Fence {
        lease: LEASE.into(),
        holder: "b".into(),
        token: token(&store, "b").await,
    };
    store
        .save_checkpoint_fenced("orders", &json!({"n": 5}), Some(&new))
        .await
        .expect("the new owner saves");
    let err = store
        .save_checkpoint_fenced("orders", &json!({"n": 3}), Some(&old))
        .await
        .expect_err("a stale token");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains(LEASE), "{err}");
    // The same holder name with an old token is refused too (a node that
    // came back and took the lease again holds a newer token).
    let stale_b = Fence {
        token: old.token,
        ..new.clone()
    };
    assert!(
        store
            .save_checkpoint_fenced("orders", &json!({"n": 4}), Some(&stale_b))
            .await
            .is_err()
    );
    let saved = store
        .checkpoint("orders")
        .await
        .expect("read")
        .expect("a checkpoint");
    assert_eq!(saved.position, json!({"n": 5}));
}

async fn nodes_register_beat_drain_and_stop(ctx: Ctx) {
    let store = ctx.open().await;
    let node = |id: &str| NewNode {
        id: id.into(),
        host: "h".into(),
        pid: 42,
        version: "0.1.0".into(),
        cluster: true,
    };
    store.register_node(&node("h:1:a")).await.expect("register");
    store.register_node(&node("h:2:b")).await.expect("register");
    assert_eq!(
        store.node_heartbeat("h:1:a", 3).await.expect("beat"),
        Some(NodeState::Active)
    );
    assert_eq!(store.node_heartbeat("gone", 0).await.expect("beat"), None);
    let nodes = store.nodes().await.expect("list");
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["h:1:a", "h:2:b"]
    );
    assert_eq!(nodes[0].owned, 3);
    assert!(nodes[0].cluster);
    assert!(nodes[0].heartbeat_age < Duration::from_secs(30));

    assert!(
        store
            .set_node_state("h:1:a", NodeState::Draining)
            .await
            .expect("drain")
    );
    assert_eq!(
        store.node_heartbeat("h:1:a", 0).await.expect("beat"),
        Some(NodeState::Draining)
    );
    // Draining twice, or a stopped node, changes nothing.
    assert!(
        !store
            .set_node_state("h:1:a", NodeState::Draining)
            .await
            .expect("drain again")
    );
    assert!(
        store
            .set_node_state("h:2:b", NodeState::Stopped)
            .await
            .expect("stop")
    );
    assert!(
        !store
            .set_node_state("h:2:b", NodeState::Draining)
            .await
            .expect("drain a stopped node")
    );
    // A node registering again (same id) is active again.
    store.register_node(&node("h:2:b")).await.expect("again");
    let states: Vec<NodeState> = store
        .nodes()
        .await
        .expect("list")
        .iter()
        .map(|n| n.state)
        .collect();
    assert_eq!(states, [NodeState::Draining, NodeState::Active]);
}
