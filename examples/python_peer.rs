//! A Rust peer of the Python package's interoperability tests
//! (`python/tests/test_interop.py`): it opens what Python made, by name, and
//! prints what it finds on stdout, one line, for the test to check.
//!
//! ```text
//! cargo run --example python_peer -- dict NAME        # get "from-python", insert "from-rust"
//! cargo run --example python_peer -- value NAME       # Value<i32>: print it, then fetch_add(10)
//! cargo run --example python_peer -- array NAME LEN   # Array<f64>: print the sum, then a[i] = 2i
//! cargo run --example python_peer -- space-out NAME   # out ("from-rust", 7, 2.5, "text", b"bytes", true)
//! cargo run --example python_peer -- space-take NAME  # take ("from-python", int, float, str, bytes, bool)
//! ```

use std::process::ExitCode;
use std::time::Duration;

use shmdict::space::{FieldKind, Space};
use shmdict::{pattern, tuple, Array, ShmDict, Value};

fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let arg = |i: usize| -> Result<&str, Box<dyn std::error::Error>> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| "missing argument (see the file's docs)".into())
    };
    let name = arg(1)?;
    Ok(match arg(0)? {
        "dict" => {
            let d = ShmDict::options().create(false).open(name)?;
            let v = d.get("from-python")?.unwrap_or_default();
            d.insert("from-rust", "written by rust")?;
            String::from_utf8(v)?
        }
        "value" => {
            let v = Value::<i32>::open(name, 0)?;
            let old = v.fetch_add(10);
            old.to_string()
        }
        "array" => {
            let a = Array::<f64>::open(name, arg(2)?.parse()?)?;
            let sum: f64 = a.read().iter().sum();
            for (i, x) in a.write().iter_mut().enumerate() {
                *x = 2.0 * i as f64;
            }
            sum.to_string()
        }
        "space-out" => {
            let s = Space::from_dict(ShmDict::options().create(false).open(name)?);
            s.out(tuple!("from-rust", 7, 2.5, "text", b"bytes", true))?;
            "posted".into()
        }
        "space-take" => {
            let s = Space::from_dict(ShmDict::options().create(false).open(name)?);
            let p = pattern!(
                "from-python",
                FieldKind::I64,
                FieldKind::F64,
                FieldKind::Str,
                FieldKind::Bytes,
                FieldKind::Bool
            );
            match s.take(&p, Duration::from_secs(10))? {
                Some(t) => format!(
                    "{} {} {} {} {}",
                    t.i64(1).ok_or("field 1")?,
                    t.f64(2).ok_or("field 2")?,
                    t.str(3).ok_or("field 3")?,
                    String::from_utf8_lossy(t.bytes(4).ok_or("field 4")?),
                    t.bool(5).ok_or("field 5")?
                ),
                None => "timeout".into(),
            }
        }
        other => return Err(format!("unknown command {other:?}").into()),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("python_peer: {e}");
            ExitCode::FAILURE
        }
    }
}
