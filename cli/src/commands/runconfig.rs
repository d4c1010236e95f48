//! `dlrm train --config FILE`: any of train's flags from a TOML file (`mini_batch_size = 128`,
//! `arch_mlp_bot = [13, 512, 256, 64, 16]`; keys are the flags' names, dashes or
//! underscores), the command line winning; and the resolved flags as such a file
//! (`--print-config`, and the settings of a run's config.json).

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use std::ffi::OsString;
use std::path::Path;

/// Flags that are not settings of a run: they say what to do with the settings.
const NOT_SETTINGS: [&str; 4] = ["help", "config", "print_config", "version"];

/// `args` (a full command line) with the settings of `dlrm train --config FILE` added: every
/// key of FILE the command line does not set, as the flag it names. `cli` is the whole command;
/// a command line that does not parse is returned as it is, for clap to report.
pub fn with_config_file(cli: &Command, mut args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Ok(matches) = cli.clone().try_get_matches_from(&args) else {
        return Ok(args);
    };
    let Some(("train", given)) = matches.subcommand() else {
        return Ok(args);
    };
    let Some(file) = given.get_one::<std::path::PathBuf>("config") else {
        return Ok(args);
    };
    let train = cli
        .find_subcommand("train")
        .context("dlrm has a train command")?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--config {}: cannot read", file.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("--config {}: not a TOML file", file.display()))?;
    for (key, value) in &table {
        let arg = train_flag(train, key, file)?;
        if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        args.extend(
            flag_args(arg, value)
                .with_context(|| format!("--config {}: key '{key}'", file.display()))?,
        );
    }
    Ok(args)
}

/// The flag of `dlrm train` that a config file's `key` names.
fn train_flag<'a>(train: &'a Command, key: &str, file: &Path) -> Result<&'a Arg> {
    let id = key.replace('-', "_");
    match train.get_arguments().find(|a| a.get_id() == id.as_str()) {
        Some(arg) if !NOT_SETTINGS.contains(&id.as_str()) && arg.get_long().is_some() => Ok(arg),
        _ => bail!(
            "--config {}: unknown key '{key}' (the keys are the flags of `dlrm train --help`, without the leading dashes)",
            file.display()
        ),
    }
}

/// The command-line words that give `arg` the config file's `value`.
fn flag_args(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>> {
    let long = format!("--{}", arg.get_long().unwrap_or_default());
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        let Some(on) = value.as_bool() else {
            bail!("{long} is a switch: give true or false");
        };
        let set = on == matches!(arg.get_action(), ArgAction::SetTrue);
        return Ok(if set { vec![long.into()] } else { vec![] });
    }
    let text = match value {
        toml::Value::Array(items) => {
            let words = items.iter().map(scalar).collect::<Result<Vec<_>>>()?;
            let Some(delimiter) = arg.get_value_delimiter() else {
                return Ok(words
                    .into_iter()
                    .map(|w| format!("{long}={w}").into())
                    .collect());
            };
            words.join(&delimiter.to_string())
        }
        other => scalar(other)?,
    };
    Ok(vec![format!("{long}={text}").into()])
}

/// A scalar value as a command line writes it.
fn scalar(value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => bail!("give a string, a number, a boolean, or an array of them"),
    })
}

/// Every setting of the run that `matches` (the `train` subcommand's, of the command `train`)
/// holds, given or defaulted, under its flag's name, with `resolved` (the values presets and
/// data decide) replacing the flags' own: a `--config` file that runs the same again.
pub fn resolved_settings(
    train: &Command,
    matches: &ArgMatches,
    resolved: Vec<(&str, toml::Value)>,
) -> toml::Table {
    let mut table = toml::Table::new();
    for arg in train.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) || arg.get_long().is_none() {
            continue;
        }
        let Some(raw) = matches.get_raw(id) else {
            continue;
        };
        let mut values: Vec<toml::Value> = raw.map(|v| typed(&v.to_string_lossy())).collect();
        let value = match values.len() {
            0 => continue,
            1 if arg.get_value_delimiter().is_none() => values.remove(0),
            _ => toml::Value::Array(values),
        };
        table.insert(id.to_string(), value);
    }
    for (key, value) in resolved {
        table.insert(key.to_string(), value);
    }
    table
}

/// A command-line word as the TOML value it reads as: a boolean, an integer, a finite float,
/// else a string.
pub fn typed(word: &str) -> toml::Value {
    if let Ok(b) = word.parse::<bool>() {
        b.into()
    } else if let Ok(i) = word.parse::<i64>() {
        i.into()
    } else if let Ok(f) = word.parse::<f64>()
        && f.is_finite()
        && word.bytes().any(|b| b.is_ascii_digit())
    {
        f.into()
    } else {
        word.into()
    }
}
