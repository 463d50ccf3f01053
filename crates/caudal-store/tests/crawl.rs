//! Crawl frontiers in the store, against every backend: a new frontier
//! starts generation 1, claims hand out queued pages shallowest first and
//! mark them fetching, links are queued once, an unfinished frontier is
//! resumed (fetching pages queued again, done pages kept), a finished one
//! starts the next generation with every page queued again and its
//! validators kept (a 304 keeps them), and reset forgets it all.

mod support;

use caudal_store::{FinishedPage, NewPage};
use jiff::Timestamp;
use support::Ctx;

backend_tests!(
    claims_are_shallowest_first_and_links_are_queued_once,
    an_unfinished_frontier_resumes_and_a_finished_one_starts_a_new_generation,
);

const F: &str = "pipeline:test";

fn page(url: &str, depth: u32) -> NewPage {
    NewPage {
        url: url.into(),
        depth,
    }
}

fn done(url: &str, state: &'static str, etag: Option<&str>) -> FinishedPage {
    FinishedPage {
        url: url.into(),
        state,
        attempts: 1,
        status: Some(if state == "unchanged" { 304 } else { 200 }),
        kind: Some("detail".into()),
        etag: etag.map(str::to_string),
        last_modified: None,
        error: None,
        fetched_at: Some(Timestamp::now()),
    }
}

async fn claims_are_shallowest_first_and_links_are_queued_once(ctx: Ctx) {
    let store = ctx.open().await;
    let opened = store.open_frontier(F).await.expect("open");
    assert_eq!(
        (opened.generation, opened.resumed, opened.fetched),
        (1, false, 0),
        "{:?}",
        ctx.backend
    );
    store
        .save_crawl_progress(
            F,
            1,
            &[page("u/deep", 2), page("u/a", 0), page("u/b", 1)],
            &[],
        )
        .await
        .expect("save");
    // A link found again is not queued twice, nor moved.
    store
        .save_crawl_progress(F, 1, &[page("u/a", 5)], &[])
        .await
        .expect("save");
    let claimed = store.claim_pages(F, 2).await.expect("claim");
    let urls: Vec<&str> = claimed.iter().map(|p| p.url.as_str()).collect();
    assert_eq!(urls, ["u/a", "u/b"]);
    assert_eq!(claimed[0].depth, 0);
    let rest = store.claim_pages(F, 10).await.expect("claim");
    assert_eq!(rest.len(), 1);
    assert!(store.claim_pages(F, 10).await.expect("claim").is_empty());
    let pages = store
        .frontier_pages(F, Some("fetching"), 10)
        .await
        .expect("pages");
    assert_eq!(pages.len(), 3);
    store.open_frontier("pipeline:tes_x").await.expect("open");
    let summary = store
        .frontiers(Some("pipeline:te"))
        .await
        .expect("frontiers");
    assert_eq!(summary.len(), 2);
    // A prefix is matched exactly (`_` and `%` are not patterns).
    let summary = store
        .frontiers(Some("pipeline:tes_"))
        .await
        .expect("frontiers");
    assert_eq!(summary.len(), 1);
    let summary = store
        .frontiers(Some("pipeline:test"))
        .await
        .expect("frontiers");
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].pages, vec![("fetching".to_string(), 3)]);
    store.reset_frontier(F).await.expect("reset");
    store.reset_frontier("pipeline:tes_x").await.expect("reset");
    assert!(store.frontiers(None).await.expect("frontiers").is_empty());
    assert!(store.frontier_urls(F).await.expect("urls").is_empty());
}

async fn an_unfinished_frontier_resumes_and_a_finished_one_starts_a_new_generation(ctx: Ctx) {
    let store = ctx.open().await;
    store.open_frontier(F).await.expect("open");
    store
        .save_crawl_progress(F, 1, &[page("u/1", 0), page("u/2", 0), page("u/3", 0)], &[])
        .await
        .expect("save");
    assert_eq!(store.claim_pages(F, 10).await.expect("claim").len(), 3);
    store
        .save_crawl_progress(F, 1, &[], &[done("u/1", "done", Some("\"e1\""))])
        .await
        .expect("save");
    // A crash here: the next open resumes generation 1.
    let opened = store.open_frontier(F).await.expect("open");
    assert_eq!(
        (opened.generation, opened.resumed, opened.fetched),
        (1, true, 1)
    );
    let again: Vec<String> = store
        .claim_pages(F, 10)
        .await
        .expect("claim")
        .into_iter()
        .map(|p| p.url)
        .collect();
    assert_eq!(again, ["u/2", "u/3"], "done pages are not claimed again");
    store
        .save_crawl_progress(
            F,
            1,
            &[],
            &[
                done("u/2", "done", Some("\"e2\"")),
                done("u/3", "done", None),
            ],
        )
        .await
        .expect("save");
    store.finish_frontier(F, 1).await.expect("finish");
    // The next crawl is generation 2, every page queued with its ETag.
    let opened = store.open_frontier(F).await.expect("open");
    assert_eq!(
        (opened.generation, opened.resumed, opened.fetched),
        (2, false, 0)
    );
    let claimed = store.claim_pages(F, 10).await.expect("claim");
    let etags: Vec<Option<&str>> = claimed.iter().map(|p| p.etag.as_deref()).collect();
    assert_eq!(etags, [Some("\"e1\""), Some("\"e2\""), None]);
    // A 304 keeps the validators it was asked with.
    store
        .save_crawl_progress(F, 2, &[], &[done("u/1", "unchanged", None)])
        .await
        .expect("save");
    store.finish_frontier(F, 2).await.expect("finish");
    store.open_frontier(F).await.expect("open");
    let claimed = store.claim_pages(F, 1).await.expect("claim");
    assert_eq!(claimed[0].etag.as_deref(), Some("\"e1\""));
    let rows = store.frontier_pages(F, None, 10).await.expect("pages");
    assert!(rows.iter().all(|r| r.generation == 3), "{rows:?}");
}
