//! Each command: read or act through the store's traits, then print a table or JSON.

use std::io::Write;
use std::time::Duration;

use cqrs_core::{EventTypes, Position, StreamId, StreamVersion};
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::connect::{connect, Connection};
use crate::output::{event_json, write_event, write_json, Table};
use crate::registry::{lag, Ops, StateAt};
use crate::{Admin, AdminError};

/// Where commands print: stdout, or a buffer in tests.
pub(crate) type Out<'a> = &'a mut (dyn Write + Send);

/// Events read per page while showing or following.
const PAGE: usize = 500;
/// How long `follow` waits for an append before looking again.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

pub(crate) async fn run(admin: &Admin, cli: &Cli, out: Out<'_>) -> Result<(), AdminError> {
    let url = cli.url.as_deref().ok_or(AdminError::NoUrl)?;
    let create = matches!(cli.command, Command::Migrate);
    let connection = connect(url, &cli.schema, create).await?;
    let json = cli.json;
    match &cli.command {
        Command::Types => types(&connection, json, out).await,
        Command::Streams {
            stream_type,
            after,
            limit,
        } => {
            streams(
                &connection,
                stream_type,
                after.as_deref(),
                *limit,
                json,
                out,
            )
            .await
        }
        Command::Show {
            stream_type,
            id,
            from_version,
            limit,
            state,
            at_version,
            as_of,
        } => {
            let stream = StreamId::new(stream_type.as_str(), id.as_str());
            if *state {
                let at = match (at_version, as_of) {
                    (Some(v), _) => StateAt::Version(*v),
                    (None, Some(t)) => StateAt::Time(*t),
                    (None, None) => StateAt::Latest,
                };
                show_state(admin, &connection, &stream, at, json, out).await
            } else {
                show(&connection, &stream, *from_version, *limit, json, out).await
            }
        }
        Command::Follow {
            stream,
            stream_type,
            event_types,
            from_start,
            count,
        } => {
            let filter = Follow {
                stream: stream.clone(),
                stream_type: stream_type.clone(),
                event_types: event_types.clone(),
                from_start: *from_start,
                count: *count,
            };
            follow(&connection, &filter, json, out).await
        }
        Command::Projections => projections(admin, &connection, json, out).await,
        Command::Rebuild { name, fresh } => {
            rebuild(admin, &connection, name, *fresh, json, out).await
        }
        Command::Reset { name } => {
            let ops = projection_ops(admin, &connection, name)?;
            with_holder(&connection, ops.reset(name)).await?;
            report(out, json, &json!({ "reset": name }), &format!(
                "`{name}` reset: its read model is cleared and it replays from the start on its next run"
            ))
        }
        Command::Skip {
            name,
            position,
            reason,
        } => {
            // `<name>.next`: the build of a blue/green rebuild, the same projection.
            let registered = match name.strip_suffix(".next") {
                Some(live) if projection_ops(admin, &connection, live)?.blue_green() => live,
                _ => name.as_str(),
            };
            let ops = projection_ops(admin, &connection, registered)?;
            with_holder(&connection, ops.skip(name, *position, reason)).await?;
            report(
                out,
                json,
                &json!({ "skipped": name, "position": position.to_string(), "reason": reason }),
                &format!("`{name}` skipped the event at {position} (recorded: {reason})"),
            )
        }
        Command::Horizon => horizon(&connection, json, out).await,
        Command::Migrate => {
            connection.migrate().await?;
            let described = connection.describe();
            report(
                out,
                json,
                &json!({ "migrated": described }),
                &format!("migrations applied: {described}"),
            )
        }
    }
}

fn report(
    out: Out<'_>,
    json: bool,
    value: &serde_json::Value,
    text: &str,
) -> Result<(), AdminError> {
    if json {
        write_json(out, value)?;
    } else {
        writeln!(out, "{text}")?;
    }
    Ok(())
}

/// The registered projection `name`, set up on `connection`.
pub(crate) fn projection_ops(
    admin: &Admin,
    connection: &Connection,
    name: &str,
) -> Result<Box<dyn Ops>, AdminError> {
    let known = || {
        if admin.projections.is_empty() {
            "none (register projections with cqrs_admin::Admin::projection in a binary of your own)"
                .to_owned()
        } else {
            admin
                .projections
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    if !admin.projections.iter().any(|p| p.name == name) {
        return Err(AdminError::UnknownProjection {
            name: name.to_owned(),
            known: known(),
        });
    }
    // One name may be registered once per backend (a projection type for each).
    let set_up = admin
        .projections
        .iter()
        .filter(|p| p.name == name)
        .find_map(|p| (p.setup)(connection));
    set_up.ok_or_else(|| AdminError::UnknownProjection {
        name: name.to_owned(),
        known: format!(
            "{} (but `{name}` is not set up for {})",
            known(),
            connection.describe()
        ),
    })
}

/// Runs `action`, naming the lease holder if the lease was refused.
async fn with_holder(
    connection: &Connection,
    action: impl std::future::Future<Output = Result<(), AdminError>>,
) -> Result<(), AdminError> {
    match action.await {
        Err(AdminError::LeaseHeld { name, .. }) => {
            let holder = match connection.admin().lease_holder(&name).await {
                Ok(Some(holder)) => format!(" ({})", holder.description),
                _ => String::new(),
            };
            Err(AdminError::LeaseHeld { name, holder })
        }
        other => other,
    }
}

async fn types(connection: &Connection, json: bool, out: Out<'_>) -> Result<(), AdminError> {
    let types = connection.admin().stream_types().await?;
    if json {
        write_json(out, &serde_json::to_value(&types).unwrap_or_default())?;
        return Ok(());
    }
    let mut table = Table::new(&["STREAM TYPE", "STREAMS", "EVENTS"]);
    for t in &types {
        table.row(vec![
            t.stream_type.clone(),
            t.streams.to_string(),
            t.events.to_string(),
        ]);
    }
    table.write(out)?;
    Ok(())
}

async fn streams(
    connection: &Connection,
    stream_type: &str,
    after: Option<&str>,
    limit: usize,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let streams = connection
        .admin()
        .list_streams(stream_type, after, limit)
        .await?;
    let next = (streams.len() >= limit)
        .then(|| streams.last().map(|s| s.stream.id().to_owned()))
        .flatten();
    if json {
        let list: Vec<_> = streams
            .iter()
            .map(|s| {
                json!({
                    "stream_type": s.stream.stream_type(),
                    "stream_id": s.stream.id(),
                    "version": s.version.get(),
                    "last_recorded_at": s.last_recorded_at.to_rfc3339(),
                })
            })
            .collect();
        write_json(out, &json!({ "streams": list, "next_after": next }))?;
        return Ok(());
    }
    let mut table = Table::new(&["STREAM ID", "VERSION", "LAST EVENT AT"]);
    for s in &streams {
        table.row(vec![
            s.stream.id().to_owned(),
            s.version.to_string(),
            s.last_recorded_at.to_rfc3339(),
        ]);
    }
    table.write(out)?;
    if let Some(next) = next {
        writeln!(out, "(more: --after '{next}')")?;
    }
    Ok(())
}

async fn show(
    connection: &Connection,
    stream: &StreamId,
    from_version: u64,
    limit: usize,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let events = connection
        .admin()
        .read_stream(
            stream,
            StreamVersion::new(from_version.max(1)),
            limit.max(1),
        )
        .await?;
    if events.is_empty() {
        return Err(AdminError::EmptyStream {
            stream: stream.to_string(),
            detail: if from_version > 1 {
                format!(" from version {from_version}")
            } else {
                String::new()
            },
        });
    }
    if json {
        let list: Vec<_> = events.iter().map(event_json).collect();
        write_json(
            out,
            &json!({ "stream": stream.to_string(), "events": list }),
        )?;
    } else {
        for event in &events {
            write_event(out, event)?;
        }
    }
    Ok(())
}

async fn show_state(
    admin: &Admin,
    connection: &Connection,
    stream: &StreamId,
    at: StateAt,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let aggregate = admin
        .aggregates
        .iter()
        .find(|a| a.stream_type == stream.stream_type())
        .ok_or_else(|| AdminError::UnknownAggregate {
            stream_type: stream.stream_type().to_owned(),
            known: if admin.aggregates.is_empty() {
                "none (register aggregates with cqrs_admin::Admin::aggregate in a binary of your own)"
                    .to_owned()
            } else {
                admin
                    .aggregates
                    .iter()
                    .map(|a| a.stream_type)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let (version, state) =
        (aggregate.load)(connection.events(), stream.id().to_owned(), at).await?;
    if version == 0 {
        return Err(AdminError::EmptyStream {
            stream: stream.to_string(),
            detail: match at {
                StateAt::Latest => String::new(),
                StateAt::Version(v) => format!(" up to version {v}"),
                StateAt::Time(t) => format!(" as of {}", t.to_rfc3339()),
            },
        });
    }
    if json {
        write_json(
            out,
            &json!({ "stream": stream.to_string(), "version": version, "state": state }),
        )?;
    } else {
        writeln!(out, "{stream} at version {version}:")?;
        let pretty = serde_json::to_string_pretty(&state).unwrap_or_default();
        for line in pretty.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

struct Follow {
    stream: Option<String>,
    stream_type: Option<String>,
    event_types: Vec<String>,
    from_start: bool,
    count: Option<u64>,
}

async fn follow(
    connection: &Connection,
    filter: &Follow,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let store = connection.admin();
    let types: Vec<&str> = filter.event_types.iter().map(String::as_str).collect();
    let types = if types.is_empty() {
        EventTypes::All
    } else {
        EventTypes::Only(&types)
    };
    let stream = match &filter.stream {
        Some(text) => Some(
            text.split_once('/')
                .map(|(t, id)| StreamId::new(t, id))
                .ok_or_else(|| {
                    AdminError::Refused(format!(
                        "--stream `{text}` is not `type/id` (e.g. account/acc-1)"
                    ))
                })?,
        ),
        None => None,
    };
    let mut after = if filter.from_start {
        Position::START
    } else {
        store.head().await?.unwrap_or(Position::START)
    };
    // On stderr, so that `--json` output stays one event per line; a script may wait for it
    // before appending.
    eprintln!("following the log after position {after} (Ctrl-C stops)");
    let mut shown = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        let events = store.read_all(after, types, PAGE).await?;
        for event in &events {
            after = event.position;
            let wanted = stream.as_ref().is_none_or(|s| &event.stream == s)
                && filter
                    .stream_type
                    .as_deref()
                    .is_none_or(|t| event.stream.stream_type() == t);
            if !wanted {
                continue;
            }
            if json {
                write_json(out, &event_json(event))?;
            } else {
                write_event(out, event)?;
            }
            out.flush()?;
            shown += 1;
            if filter.count.is_some_and(|count| shown >= count) {
                return Ok(());
            }
        }
        if events.len() < PAGE {
            tokio::select! {
                () = store.wait_for_append(after, FOLLOW_POLL) => {}
                _ = &mut interrupt => return Ok(()),
            }
        }
    }
}

async fn projections(
    admin: &Admin,
    connection: &Connection,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let store = connection.admin();
    let checkpoints = store.checkpoints().await?;
    let mut names: Vec<String> = checkpoints.iter().map(|c| c.name.clone()).collect();
    for registered in &admin.projections {
        if !names.iter().any(|n| n == registered.name) {
            names.push(registered.name.to_owned());
        }
    }
    names.sort();
    let mut rows = Vec::new();
    for name in &names {
        let checkpoint = checkpoints.iter().find(|c| &c.name == name);
        let position = checkpoint.map(|c| c.position);
        let ops = admin
            .projections
            .iter()
            .filter(|p| p.name == name)
            .find_map(|p| (p.setup)(connection));
        // A registered projection's lag counts the events it handles; an unregistered one's
        // counts every event after its checkpoint.
        let types = ops.as_ref().map_or(EventTypes::All, |o| o.event_types());
        let lag = lag(store, position, types).await?;
        let holder = store.lease_holder(name).await?;
        let skipped = store.skipped(name).await?;
        let failure = store.last_failure(name).await?;
        let state = match (&holder, &failure, position) {
            (Some(_), Some(_), _) => "failing",
            (Some(_), None, _) => "running",
            (None, Some(_), _) => "stopped, failed",
            (None, None, None) => "not started",
            (None, None, Some(_)) if lag == 0 => "idle, caught up",
            (None, None, Some(_)) => "idle, behind",
        };
        let last_error = failure.as_ref().map(|f| {
            json!({
                "cause": f.failure.cause.name(),
                "position": f.failure.position.map(|p| p.to_string()),
                "event_type": f.failure.event_type,
                "message": f.failure.message,
                "skippable": f.failure.skippable(),
                "failed_at": f.failed_at.to_rfc3339(),
            })
        });
        rows.push(json!({
            "name": name,
            "registered": ops.is_some(),
            "state": state,
            "checkpoint": position.map(|p| p.to_string()),
            "updated_at": checkpoint.and_then(|c| c.updated_at).map(|t| t.to_rfc3339()),
            "lag": lag,
            "lag_counts": if ops.is_some() { "handled events" } else { "all events" },
            "runner": holder,
            "skipped": skipped,
            "last_error": last_error,
        }));
    }
    if json {
        write_json(out, &json!({ "projections": rows }))?;
        return Ok(());
    }
    let mut table = Table::new(&[
        "PROJECTION",
        "STATE",
        "CHECKPOINT",
        "LAG",
        "SKIPPED",
        "RUNNER",
        "LAST ERROR",
    ]);
    for row in &rows {
        let text = |key: &str| row[key].as_str().unwrap_or("-").to_owned();
        let lag = row["lag"].to_string();
        let lag = if row["registered"] == true {
            lag
        } else {
            format!("{lag}*")
        };
        let skipped = row["skipped"].as_array().map_or(0, Vec::len);
        let runner = row["runner"]["description"]
            .as_str()
            .unwrap_or("-")
            .to_owned();
        table.row(vec![
            text("name"),
            text("state"),
            text("checkpoint"),
            lag,
            skipped.to_string(),
            runner,
            last_error_cell(&row["last_error"]),
        ]);
    }
    table.write(out)?;
    if rows.iter().any(|r| r["registered"] == false) {
        writeln!(
            out,
            "* not registered here: the lag counts every event after the checkpoint"
        )?;
    }
    Ok(())
}

/// A recorded failure in one table cell: where, what, and the first line of the message.
fn last_error_cell(error: &serde_json::Value) -> String {
    if error.is_null() {
        return "-".to_owned();
    }
    let mut cell = String::new();
    if let Some(position) = error["position"].as_str() {
        cell.push_str(&format!("at {position} "));
    }
    match error["event_type"].as_str() {
        Some(event_type) => cell.push_str(&format!(
            "({event_type}, {})",
            error["cause"].as_str().unwrap_or("?")
        )),
        None => cell.push_str(&format!("({})", error["cause"].as_str().unwrap_or("?"))),
    }
    let message = error["message"].as_str().unwrap_or_default();
    let first = message.lines().next().unwrap_or_default();
    const WIDTH: usize = 60;
    let shown: String = first.chars().take(WIDTH).collect();
    let cut = shown.len() < message.len();
    cell.push_str(&format!(": {shown}{}", if cut { "…" } else { "" }));
    cell
}

async fn rebuild(
    admin: &Admin,
    connection: &Connection,
    name: &str,
    fresh: bool,
    json: bool,
    out: Out<'_>,
) -> Result<(), AdminError> {
    let ops = projection_ops(admin, connection, name)?;
    let blue_green = ops.blue_green();
    let bar = indicatif::ProgressBar::new(0);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(if blue_green {
        format!("building {name} beside the live version")
    } else {
        format!("rebuilding {name}")
    });
    let mut last = cqrs_core::subscription::Progress {
        done: 0,
        total: 0,
        rate: 0.0,
    };
    let rebuilding = {
        let bar = bar.clone();
        let last = &mut last;
        with_holder(connection, async move {
            let mut progress = |p: cqrs_core::subscription::Progress| {
                bar.set_length(p.total);
                bar.set_position(p.done);
                *last = p;
            };
            ops.rebuild(name, fresh, &mut progress).await
        })
    };
    let outcome = tokio::select! {
        outcome = rebuilding => outcome,
        _ = tokio::signal::ctrl_c() => {
            bar.abandon();
            return Err(AdminError::Interrupted(if blue_green {
                format!(
                    "the rebuild of `{name}` stopped before its switch: the live version keeps serving; the partial build under `{}` is prepared afresh by the next rebuild",
                    crate::registry::building_name(name)
                )
            } else {
                format!(
                    "the rebuild of `{name}` stopped; the batches applied so far are committed with its checkpoint, and its next run (or another rebuild) continues from there"
                )
            }));
        }
    };
    bar.finish_and_clear();
    outcome?;
    let checkpoint = connection
        .admin()
        .checkpoints()
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.position.to_string());
    report(
        out,
        json,
        &json!({
            "rebuilt": name,
            "blue_green": blue_green,
            "events": last.done,
            "checkpoint": checkpoint,
            "events_per_second": last.rate,
        }),
        &format!(
            "`{name}` rebuilt{}: {} events applied ({:.0} events/s), checkpoint {}",
            if blue_green {
                " beside the live version and switched to"
            } else {
                ""
            },
            last.done,
            last.rate,
            checkpoint.as_deref().unwrap_or("-")
        ),
    )
}

async fn horizon(connection: &Connection, json: bool, out: Out<'_>) -> Result<(), AdminError> {
    let report = connection.admin().horizon_report().await?;
    if json {
        write_json(out, &serde_json::to_value(&report).unwrap_or_default())?;
        return Ok(());
    }
    writeln!(out, "{}", report.description)?;
    if let Some(holder) = &report.held_by {
        if let Some(since) = holder.since {
            let held = chrono::Utc::now().signed_duration_since(since);
            writeln!(
                out,
                "transaction {} has run for {} s{}",
                holder.transaction,
                held.num_seconds(),
                holder
                    .pid
                    .map(|pid| format!("; end it with SELECT pg_terminate_backend({pid})"))
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(())
}
