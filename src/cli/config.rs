//! `tilt serve --config FILE`: a TOML file of settings named as `tilt serve`'s flags. Each
//! setting that neither the command line nor the environment gave becomes that flag, so a file
//! is checked exactly as the flags are.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command};

/// `args` with the config file's settings appended as flags (when `serve` is given a file),
/// and that file. Arguments that do not parse are returned unchanged, for clap to report.
pub fn with_config_file(
    command: &Command,
    mut args: Vec<OsString>,
) -> Result<(Vec<OsString>, Option<PathBuf>)> {
    let Ok(matches) = command.clone().try_get_matches_from(&args) else {
        return Ok((args, None));
    };
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok((args, None));
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Ok((args, None));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let settings: toml::Table = (text.parse())
        .with_context(|| format!("the config file {} is not TOML", path.display()))?;
    let serve_command = command.find_subcommand("serve").expect("tilt has `serve`");
    let flags: Vec<&Arg> = (serve_command.get_arguments())
        .chain(command.get_arguments())
        .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "config"))
        .collect();
    for (key, value) in settings {
        let name = key.replace('_', "-");
        let Some(flag) = flags.iter().find(|a| a.get_long() == Some(name.as_str())) else {
            let known: Vec<&str> = flags.iter().filter_map(|a| a.get_long()).collect();
            bail!(
                "{}: `{key}` is not a setting of `tilt serve`; the settings are its flags: {}",
                path.display(),
                known.join(", ")
            );
        };
        let id = flag.get_id().as_str();
        let given = [&matches, serve].iter().any(|m| {
            matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        });
        if !given {
            args.extend(
                as_flags(&name, flag, &value)
                    .with_context(|| format!("{}: the setting `{key}`", path.display()))?,
            );
        }
    }
    Ok((args, Some(path.clone())))
}

/// A setting as the command line would give it.
fn as_flags(name: &str, flag: &Arg, value: &toml::Value) -> Result<Vec<OsString>> {
    let scalar = |v: &toml::Value| -> Result<OsString> {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => bail!("expected a string or a number, got {}", other.type_str()),
        };
        Ok(format!("--{name}={text}").into())
    };
    match (flag.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => Ok(if *on {
            vec![format!("--{name}").into()]
        } else {
            Vec::new()
        }),
        (ArgAction::SetTrue, other) => bail!("expected true or false, got {}", other.type_str()),
        (ArgAction::Append, toml::Value::Array(items)) => items.iter().map(scalar).collect(),
        (_, toml::Value::Array(_)) => bail!("takes one value, not a list"),
        (_, v) => Ok(vec![scalar(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::{Cli, Command as Sub, ServeArgs};

    /// `tilt serve ARGS` with `toml` as its config file.
    fn serve(toml: &str, args: &[&str]) -> Result<ServeArgs> {
        Ok(match parse(toml, args)?.command {
            Sub::Serve(args) => args,
            _ => unreachable!(),
        })
    }

    fn parse(toml: &str, args: &[&str]) -> Result<Cli> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tilt.toml");
        std::fs::write(&file, toml)?;
        let mut argv: Vec<OsString> = vec!["tilt".into(), "serve".into()];
        argv.push(format!("--config={}", file.display()).into());
        argv.extend(args.iter().map(OsString::from));
        let command = Cli::command();
        let (argv, _) = with_config_file(&command, argv)?;
        Ok(Cli::from_arg_matches(&command.try_get_matches_from(argv)?)?)
    }

    #[test]
    fn settings_fill_in_what_the_command_line_leaves() {
        let args = serve(
            "port = 9000\nmax_queue = 3\nhost = \"0.0.0.0\"\nshutdown-grace = 0.5\n\
             no_default_rewards = true\nprivate_metrics = false\napi-key = [\"k1\", \"k2\"]\n\
             reward = [\"a=x.gguf\"]\n",
            &["--port", "7000"],
        )
        .unwrap();
        assert_eq!(
            (args.port, args.max_queue, args.host.as_str()),
            (7000, 3, "0.0.0.0")
        );
        assert_eq!(args.shutdown_grace, 0.5);
        assert!(args.no_default_rewards && !args.private_metrics);
        assert_eq!(args.api_keys, ["k1", "k2"]);
        assert_eq!(args.rewards, [("a".to_string(), PathBuf::from("x.gguf"))]);
    }

    #[test]
    fn global_flags_are_settings_too() {
        let cli = parse("threads = 1\nlog-format = \"json\"\n", &[]).unwrap();
        assert_eq!(cli.threads, Some(1));
        assert!(matches!(cli.log_format, crate::LogFormat::Json));
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        std::env::set_var("TILT_INTERLEAVED_PREFILL", "17");
        let args = serve("interleaved_prefill = 5\nmax_running = 2\n", &[]);
        std::env::remove_var("TILT_INTERLEAVED_PREFILL");
        let args = args.unwrap();
        assert_eq!((args.interleaved_prefill, args.max_running), (17, 2));
    }

    #[test]
    fn mistakes_name_the_file_and_the_setting() {
        let error = |toml: &str| format!("{:#}", serve(toml, &[]).err().expect("an error"));
        let unknown = error("prot = 1\n");
        assert!(
            unknown.contains("`prot` is not a setting") && unknown.contains("port"),
            "{unknown}"
        );
        assert!(error("port = [1]\n").contains("takes one value"));
        assert!(error("private_metrics = 1\n").contains("true or false"));
        assert!(error("host = { a = 1 }\n").contains("a string or a number"));
        assert!(error("port = \"x\"\n").contains("invalid value"));
        assert!(error("port = \n").contains("not TOML"));
    }

    #[test]
    fn every_flag_of_serve_reads_the_environment_too() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        for arg in serve
            .get_arguments()
            .filter(|a| a.get_long() != Some("help"))
        {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("TILT_")),
                "--{} has no TILT_ variable",
                arg.get_long().unwrap_or_default()
            );
        }
    }
}
