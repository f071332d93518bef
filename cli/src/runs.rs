//! `qflow runs …`: the runs in the run store — listed, shown, run again.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use qflow::model::{RunQuery, RunRecord, RunState, RunStore, printable};
use qflow::{Flow, Format, RunOptions};

use crate::{
    HostArgs, Printed, Room, STORED_OUTPUT_BYTES, flush, host_with_room, limits, open_store,
    status_code,
};

#[derive(Subcommand)]
pub(crate) enum Command {
    /// The newest runs first.
    List {
        /// Only this flow's runs.
        #[arg(long)]
        flow: Option<String>,
        /// Only runs in this state: running, succeeded, failed, cancelled
        /// or interrupted.
        #[arg(long)]
        status: Option<RunState>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        host: HostArgs,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One run: its state, input and every step's report.
    Show {
        /// The run's id.
        id: String,
        #[command(flatten)]
        host: HostArgs,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run a stored run's flow again, as it was then, on the same input.
    Rerun {
        /// The run's id.
        id: String,
        #[command(flatten)]
        host: HostArgs,
        /// Print a machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List { flow, status, limit, host, json } => {
            let store = open_store(&host).await?;
            let mut query = RunQuery::newest(limit);
            query.flow = flow;
            query.status = status;
            let records = store.runs(query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else if records.is_empty() {
                println!("no runs");
            } else {
                for record in &records {
                    println!("{}", line(record));
                }
            }
        }
        Command::Show { id, host, json } => {
            let store = open_store(&host).await?;
            let record = store.run(&id).await?.with_context(|| no_run(&id))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                println!("{}", line(&record));
                println!("input: {}", record.input);
                if let Some(summary) = &record.summary {
                    for step in &summary.steps {
                        let error =
                            step.error.as_ref().map(|e| format!(": {}", printable(&e.message)));
                        println!(
                            "  {:<16} {:<10} {} attempt(s){}",
                            step.id,
                            format!("{:?}", step.status).to_lowercase(),
                            step.attempts,
                            error.unwrap_or_default()
                        );
                    }
                }
            }
        }
        Command::Rerun { id, host: args, json } => {
            let store = open_store(&args).await?;
            let record = store.run(&id).await?.with_context(|| no_run(&id))?;
            let (text, origin) = store.flow_of(&id).await?.with_context(|| no_run(&id))?;
            let path = Path::new(&origin);
            let format = if path.extension().is_some_and(|e| e == "json") {
                Format::Json
            } else {
                Format::Toml
            };
            let base = path.parent().unwrap_or(Path::new("."));
            let flow = Flow::parse_with(&text, format, &origin, base, &limits())?;
            let host = host_with_room(&args, Room::Flow(flow.steps.len()))?
                .with_store(store, STORED_OUTPUT_BYTES)
                .await?;
            let summary = host.run_with(&flow, record.input, RunOptions::new()).await?;
            flush(&host).await;
            Printed::json(json).print(&flow, &summary)?;
            return Ok(status_code(summary.status));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn no_run(id: &str) -> String {
    format!("the run store has no run {id}")
}

/// One run on one line: id, flow, state, wall time, when.
fn line(record: &RunRecord) -> String {
    let wall = record
        .summary
        .as_ref()
        .map(|s| format!("{:.1} ms", s.wall_ms))
        .unwrap_or_else(|| "-".to_owned());
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(record.started_at_ms).unwrap_or(0)),
    );
    format!("{}  {:<20} {:<11} {:>10}  {when}", record.run_id, record.flow, record.status, wall)
}
