//! Parameter validation: user values (`--param k=v` strings or TOML values)
//! checked against a plugin's declared `param-spec`s and converted to typed
//! [`ParamValue`]s before any plugin call. Unknown keys and bad types are
//! errors that name the plugin and the key.

use crate::types::{Metadata, ParamSpec, ParamValue};
use anyhow::{bail, Result};

/// Validated parameters for one plugin: every declared parameter, in
/// declaration order, with the user's value or the default.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    plugin: String,
    values: Vec<(String, ParamValue)>,
}

impl Params {
    /// The plugin these parameters were validated for.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// All (name, value) pairs in declaration order.
    pub fn values(&self) -> &[(String, ParamValue)] {
        &self.values
    }

    /// The value of one parameter, if declared.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The defaults of every declared parameter.
    pub fn defaults(meta: &Metadata) -> Params {
        Params {
            plugin: meta.name.clone(),
            values: meta
                .params
                .iter()
                .map(|p| (p.name.clone(), p.default.clone()))
                .collect(),
        }
    }

    /// Validate `key=value` strings (as given on the command line).
    pub fn from_strings(meta: &Metadata, given: &[(String, String)]) -> Result<Params> {
        let mut params = Params::defaults(meta);
        for (key, raw) in given {
            let spec = find_spec(meta, key)?;
            let value = parse_str(&meta.name, spec, raw)?;
            params.set(key, value);
        }
        Ok(params)
    }

    /// Validate a TOML table (e.g. `[plugins.ties.params]` of a pipeline.toml).
    pub fn from_toml(meta: &Metadata, table: &toml::Table) -> Result<Params> {
        let mut params = Params::defaults(meta);
        for (key, raw) in table {
            let spec = find_spec(meta, key)?;
            let value = convert_toml(&meta.name, spec, raw)?;
            params.set(key, value);
        }
        Ok(params)
    }

    fn set(&mut self, key: &str, value: ParamValue) {
        if let Some(slot) = self.values.iter_mut().find(|(n, _)| n == key) {
            slot.1 = value;
        }
    }
}

fn find_spec<'a>(meta: &'a Metadata, key: &str) -> Result<&'a ParamSpec> {
    match meta.params.iter().find(|p| p.name == key) {
        Some(s) => Ok(s),
        None if meta.params.is_empty() => bail!(
            "plugin \"{}\": unknown parameter \"{key}\": this plugin takes no parameters",
            meta.name
        ),
        None => bail!(
            "plugin \"{}\": unknown parameter \"{key}\" (known: {}; see `selma plugins inspect {}`)",
            meta.name,
            meta.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
            meta.name
        ),
    }
}

fn type_error(plugin: &str, spec: &ParamSpec, got: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "plugin \"{plugin}\": parameter \"{}\" must be {} {} (default {}), got {got}",
        spec.name,
        if spec.default.type_name() == "integer" {
            "an"
        } else {
            "a"
        },
        spec.default.type_name(),
        spec.default
    )
}

fn parse_str(plugin: &str, spec: &ParamSpec, raw: &str) -> Result<ParamValue> {
    let s = raw.trim();
    let bad = || type_error(plugin, spec, &format!("{raw:?}"));
    Ok(match &spec.default {
        ParamValue::Boolean(_) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => ParamValue::Boolean(true),
            "false" | "no" | "off" | "0" => ParamValue::Boolean(false),
            _ => return Err(bad()),
        },
        ParamValue::Integer(_) => ParamValue::Integer(s.parse::<i64>().map_err(|_| bad())?),
        ParamValue::Number(_) => {
            let x = s.parse::<f64>().map_err(|_| bad())?;
            if !x.is_finite() {
                return Err(bad());
            }
            ParamValue::Number(x)
        }
        ParamValue::Text(_) => ParamValue::Text(raw.to_string()),
    })
}

fn convert_toml(plugin: &str, spec: &ParamSpec, raw: &toml::Value) -> Result<ParamValue> {
    let bad = || type_error(plugin, spec, &format!("{} {raw}", raw.type_str()));
    Ok(match (&spec.default, raw) {
        (ParamValue::Boolean(_), toml::Value::Boolean(b)) => ParamValue::Boolean(*b),
        (ParamValue::Integer(_), toml::Value::Integer(i)) => ParamValue::Integer(*i),
        (ParamValue::Number(_), toml::Value::Float(x)) if x.is_finite() => ParamValue::Number(*x),
        (ParamValue::Number(_), toml::Value::Integer(i)) => ParamValue::Number(*i as f64),
        (ParamValue::Text(_), toml::Value::String(s)) => ParamValue::Text(s.clone()),
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PluginKind;

    fn meta() -> Metadata {
        let spec = |name: &str, default| ParamSpec {
            name: name.into(),
            default,
            help: String::new(),
        };
        Metadata {
            name: "ties".into(),
            version: "0.1.0".into(),
            kind: PluginKind::MergeStrategy,
            description: String::new(),
            help: String::new(),
            params: vec![
                spec("density", ParamValue::Number(0.2)),
                spec("steps", ParamValue::Integer(3)),
                spec("rescale", ParamValue::Boolean(true)),
                spec("variant", ParamValue::Text("linear".into())),
            ],
        }
    }

    #[test]
    fn strings_convert_to_declared_types_and_defaults_fill_the_rest() {
        let p = Params::from_strings(
            &meta(),
            &[
                ("density".into(), "0.5".into()),
                ("rescale".into(), "false".into()),
            ],
        )
        .unwrap();
        assert_eq!(p.get("density"), Some(&ParamValue::Number(0.5)));
        assert_eq!(p.get("steps"), Some(&ParamValue::Integer(3)));
        assert_eq!(p.get("rescale"), Some(&ParamValue::Boolean(false)));
        assert_eq!(p.get("variant"), Some(&ParamValue::Text("linear".into())));
        assert_eq!(p.values().len(), 4);
    }

    #[test]
    fn unknown_key_and_bad_type_name_plugin_and_key() {
        let e = Params::from_strings(&meta(), &[("dens".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"ties\"") && e.contains("\"dens\"") && e.contains("density"),
            "{e}"
        );
        let e = Params::from_strings(&meta(), &[("steps".into(), "2.5".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"ties\"") && e.contains("\"steps\"") && e.contains("integer"),
            "{e}"
        );
        let e = Params::from_strings(&meta(), &[("density".into(), "nan".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"density\""), "{e}");
    }

    #[test]
    fn toml_values_convert_and_integers_widen_to_numbers_only() {
        let t: toml::Table = toml::from_str("density = 1\nsteps = 7\nvariant = \"ties\"").unwrap();
        let p = Params::from_toml(&meta(), &t).unwrap();
        assert_eq!(p.get("density"), Some(&ParamValue::Number(1.0)));
        assert_eq!(p.get("steps"), Some(&ParamValue::Integer(7)));
        assert_eq!(p.get("variant"), Some(&ParamValue::Text("ties".into())));
        let t: toml::Table = toml::from_str("steps = 1.5").unwrap();
        let e = Params::from_toml(&meta(), &t).unwrap_err().to_string();
        assert!(e.contains("\"steps\"") && e.contains("float"), "{e}");
    }
}
