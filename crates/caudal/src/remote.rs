//! `caudal status`, `caudal dlq list|show|discard` and `caudal top`
//! against a running `caudal run` through its REST API (`--api URL --token
//! T`), printed as the commands print what they read from the store.

use std::process::ExitCode;

use serde_json::Value;

use caudal_server::openapi::{
    CrawlSite, CrawlSiteList, DeadLetterDetail, DeadLetterPage, ErrorBody, PipelineList, Replayed,
    WorkflowRunInfo, WorkflowRunList,
};

use crate::cli::{Cli, DlqCommand};
use crate::commands::{EXIT_FAILED, print_letters, print_status};

/// A running daemon's API.
pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    /// The API the arguments point to, if they do.
    pub fn from_args(cli: &Cli) -> Option<Self> {
        let base = cli.api.as_ref()?.trim_end_matches('/').to_string();
        Some(Self {
            base,
            token: cli.token.clone(),
            http: reqwest::Client::new(),
        })
    }

    /// Sends one request (a JSON `body` if given); an error answer is the
    /// API's message.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(b) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach the caudal API at {}: {e}", self.base))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map_or_else(|_| status.to_string(), |b| b.error.message);
        Err(format!(
            "the caudal API answered {}: {message}",
            status.as_u16()
        ))
    }

    /// GETs `path` and reads the answer as `T`; an error answer is the
    /// API's message.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let answer = self.send(reqwest::Method::GET, path, None).await?;
        serde_json::from_value(answer)
            .map_err(|e| format!("the caudal API answered {path} with an unexpected shape: {e}"))
    }

    /// The latest `limit` workflow runs, newest first.
    pub async fn workflow_runs(&self, limit: u32) -> Result<Vec<WorkflowRunInfo>, String> {
        let list: WorkflowRunList = self
            .get(&format!("/api/v1/workflow-runs?limit={limit}"))
            .await?;
        Ok(list.runs)
    }

    /// The sites the daemon's crawler has asked, by host.
    pub async fn crawl_sites(&self) -> Result<Vec<CrawlSite>, String> {
        let list: CrawlSiteList = self.get("/api/v1/crawl/sites").await?;
        Ok(list.sites)
    }

    /// As [`Self::get`], reporting an error and giving the exit code.
    async fn fetch<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ExitCode> {
        self.get(path).await.map_err(report)
    }

    /// As [`Self::send`], reporting an error and giving the exit code.
    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Value, ExitCode> {
        self.send(method, path, None).await.map_err(report)
    }

    /// POSTs a JSON body, reporting an error and giving the exit code.
    async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ExitCode> {
        self.send(reqwest::Method::POST, path, Some(body))
            .await
            .map_err(report)
    }

    /// Asks the daemon for a backup into `to` (its `[backup] dir` if
    /// `None`).
    pub async fn backup(
        &self,
        to: Option<&std::path::Path>,
    ) -> Result<caudal_server::openapi::BackupTaken, ExitCode> {
        let body = match to {
            Some(dir) => serde_json::json!({ "to": dir.display().to_string() }),
            None => serde_json::json!({}),
        };
        let answer = self.post_json("/api/v1/backups", &body).await?;
        serde_json::from_value(answer).map_err(|e| {
            eprintln!(
                "error: the caudal API answered /api/v1/backups with an unexpected shape: {e}"
            );
            ExitCode::from(EXIT_FAILED)
        })
    }

    pub async fn status(&self, json: bool) -> ExitCode {
        match self.fetch::<PipelineList>("/api/v1/pipelines").await {
            Err(code) => code,
            Ok(list) => {
                print_status(&list.pipelines, json);
                ExitCode::SUCCESS
            }
        }
    }

    pub async fn dlq(&self, command: &DlqCommand) -> ExitCode {
        match command {
            DlqCommand::List {
                pipeline,
                all,
                json,
            } => {
                let mut rows = Vec::new();
                let mut cursor: Option<i64> = None;
                loop {
                    let mut path = String::from("/api/v1/dead-letters?limit=500");
                    if let Some(p) = pipeline {
                        path.push_str(&format!("&pipeline={}", urlencode(p)));
                    }
                    if !all {
                        path.push_str("&state=pending");
                    }
                    if let Some(c) = cursor {
                        path.push_str(&format!("&cursor={c}"));
                    }
                    let page = match self.fetch::<DeadLetterPage>(&path).await {
                        Ok(p) => p,
                        Err(code) => return code,
                    };
                    rows.extend(page.dead_letters);
                    cursor = page.next_cursor;
                    if cursor.is_none() {
                        break;
                    }
                }
                print_letters(&rows, *json);
                ExitCode::SUCCESS
            }
            DlqCommand::Show { id } => {
                match self
                    .fetch::<DeadLetterDetail>(&format!("/api/v1/dead-letters/{id}"))
                    .await
                {
                    Err(code) => code,
                    Ok(letter) => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&letter).unwrap_or_default()
                        );
                        ExitCode::SUCCESS
                    }
                }
            }
            DlqCommand::Discard { ids } => {
                for id in ids {
                    if let Err(code) = self
                        .call(
                            reqwest::Method::POST,
                            &format!("/api/v1/dead-letters/{id}/discard"),
                        )
                        .await
                    {
                        return code;
                    }
                }
                println!("discarded {} dead letters", ids.len());
                ExitCode::SUCCESS
            }
            DlqCommand::Replay { pipeline, ids } => {
                let body = if ids.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::json!({ "ids": ids })
                };
                let path = format!(
                    "/api/v1/pipelines/{}/dead-letters/replay",
                    urlencode(pipeline)
                );
                let done = match self.post_json(&path, &body).await {
                    Err(code) => return code,
                    Ok(done) => serde_json::from_value::<Replayed>(done),
                };
                match done {
                    Err(e) => report(format!("the caudal API answered an unexpected shape: {e}")),
                    Ok(done) => {
                        println!(
                            "{pipeline}: {} dead letters delivered, {} refused again (kept as new dead letters)",
                            done.delivered, done.rejected_again
                        );
                        ExitCode::SUCCESS
                    }
                }
            }
        }
    }
}

fn report(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILED)
}

/// Percent-encodes a query value.
fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
