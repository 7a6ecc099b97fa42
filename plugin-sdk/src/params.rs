//! Typed access to the parameters the host passes to a call, and helpers to
//! declare parameter specs in [`crate::Metadata`].

use crate::{Param, ParamSpec, ParamValue};

/// The parameters of one call: every declared parameter, with the user's
/// value or its default (the host has already converted the types).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(Vec<Param>);

impl Params {
    /// Wrap the host's parameter list.
    pub fn new(params: Vec<Param>) -> Self {
        Self(params)
    }

    /// Build from `(name, value)` pairs (handy in tests).
    pub fn from_pairs<I, S>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (S, ParamValue)>,
        S: Into<String>,
    {
        Self(
            pairs
                .into_iter()
                .map(|(name, value)| Param {
                    name: name.into(),
                    value,
                })
                .collect(),
        )
    }

    /// The raw value of `name`, if the host passed it.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.iter().find(|p| p.name == name).map(|p| &p.value)
    }

    /// All parameters, in the host's order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.0.iter()
    }

    fn require(&self, name: &str) -> Result<&ParamValue, String> {
        self.get(name).ok_or_else(|| {
            format!(
                "parameter \"{name}\" was not passed by the host; declare it in the plugin's \
                 metadata().params so the host fills in its default"
            )
        })
    }

    /// A number. Integers are accepted and converted.
    pub fn f64(&self, name: &str) -> Result<f64, String> {
        match self.require(name)? {
            ParamValue::Number(x) => Ok(*x),
            ParamValue::Integer(i) => Ok(*i as f64),
            other => Err(type_error(name, "a number", other)),
        }
    }

    /// A number as f32 (see [`Params::f64`]).
    pub fn f32(&self, name: &str) -> Result<f32, String> {
        self.f64(name).map(|x| x as f32)
    }

    /// An integer. A number with an exact integer value is accepted.
    pub fn i64(&self, name: &str) -> Result<i64, String> {
        match self.require(name)? {
            ParamValue::Integer(i) => Ok(*i),
            ParamValue::Number(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(*x as i64),
            other => Err(type_error(name, "an integer", other)),
        }
    }

    /// A non-negative integer that fits in u32.
    pub fn u32(&self, name: &str) -> Result<u32, String> {
        let v = self.i64(name)?;
        u32::try_from(v).map_err(|_| {
            format!(
                "parameter \"{name}\": expected an integer in 0..={}, got {v}",
                u32::MAX
            )
        })
    }

    /// A boolean.
    pub fn bool(&self, name: &str) -> Result<bool, String> {
        match self.require(name)? {
            ParamValue::Boolean(b) => Ok(*b),
            other => Err(type_error(name, "a boolean", other)),
        }
    }

    /// A text value.
    pub fn str(&self, name: &str) -> Result<&str, String> {
        match self.require(name)? {
            ParamValue::Text(s) => Ok(s),
            other => Err(type_error(name, "a text", other)),
        }
    }
}

impl From<Vec<Param>> for Params {
    fn from(params: Vec<Param>) -> Self {
        Self(params)
    }
}

fn type_error(name: &str, expected: &str, got: &ParamValue) -> String {
    format!(
        "parameter \"{name}\": expected {expected}, got {}",
        describe(got)
    )
}

/// A short human description of a value, e.g. `text "abc"`.
pub fn describe(value: &ParamValue) -> String {
    match value {
        ParamValue::Boolean(b) => format!("boolean {b}"),
        ParamValue::Integer(i) => format!("integer {i}"),
        ParamValue::Number(x) => format!("number {x}"),
        ParamValue::Text(s) => format!("text {s:?}"),
    }
}

/// A number parameter spec.
pub fn number(name: &str, default: f64, help: &str) -> ParamSpec {
    spec(name, ParamValue::Number(default), help)
}

/// An integer parameter spec.
pub fn integer(name: &str, default: i64, help: &str) -> ParamSpec {
    spec(name, ParamValue::Integer(default), help)
}

/// A boolean parameter spec.
pub fn boolean(name: &str, default: bool, help: &str) -> ParamSpec {
    spec(name, ParamValue::Boolean(default), help)
}

/// A text parameter spec.
pub fn text(name: &str, default: &str, help: &str) -> ParamSpec {
    spec(name, ParamValue::Text(default.to_string()), help)
}

fn spec(name: &str, default: ParamValue, help: &str) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        default,
        help: help.to_string(),
    }
}

/// The defaults of `specs` as a [`Params`] (what the host passes when the
/// user sets nothing); useful in native tests of plugin logic.
pub fn defaults(specs: &[ParamSpec]) -> Params {
    Params(
        specs
            .iter()
            .map(|s| Param {
                name: s.name.clone(),
                value: s.default.clone(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Params {
        Params::from_pairs([
            ("density", ParamValue::Number(0.25)),
            ("rank", ParamValue::Integer(8)),
            ("whole", ParamValue::Number(3.0)),
            ("flag", ParamValue::Boolean(true)),
            ("words", ParamValue::Text("a, b".into())),
            ("neg", ParamValue::Integer(-1)),
        ])
    }

    #[test]
    fn typed_accessors_convert_compatible_values() {
        let p = sample();
        assert_eq!(p.f64("density"), Ok(0.25));
        assert_eq!(p.f64("rank"), Ok(8.0));
        assert_eq!(p.i64("rank"), Ok(8));
        assert_eq!(p.i64("whole"), Ok(3));
        assert_eq!(p.u32("rank"), Ok(8));
        assert_eq!(p.bool("flag"), Ok(true));
        assert_eq!(p.str("words"), Ok("a, b"));
    }

    #[test]
    fn errors_name_the_parameter_and_the_problem() {
        let p = sample();
        let e = p.i64("density").unwrap_err();
        assert!(
            e.contains("\"density\"") && e.contains("integer") && e.contains("0.25"),
            "{e}"
        );
        let e = p.bool("words").unwrap_err();
        assert!(
            e.contains("\"words\"") && e.contains("text \"a, b\""),
            "{e}"
        );
        let e = p.f64("missing").unwrap_err();
        assert!(e.contains("\"missing\"") && e.contains("metadata"), "{e}");
        let e = p.u32("neg").unwrap_err();
        assert!(e.contains("\"neg\"") && e.contains("-1"), "{e}");
    }

    #[test]
    fn defaults_mirror_specs() {
        let specs = [number("threshold", 0.8, "h"), text("words", "x", "h")];
        let p = defaults(&specs);
        assert_eq!(p.f64("threshold"), Ok(0.8));
        assert_eq!(p.str("words"), Ok("x"));
        assert_eq!(p.iter().count(), 2);
    }
}
