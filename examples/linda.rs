//! lindypy's introductory example on `shmdict::space`: worker processes
//! take 4-tuples of numbers from a tuple space and add them into a shared
//! `("sum", n)` tuple; one worker fails and reports it with an error tuple.
//!
//! `cargo run --example linda`

use std::time::Duration;

use shmdict::space::{FieldKind, Space};
use shmdict::{pattern, tuple};

fn main() -> Result<(), shmdict::Error> {
    let name = format!("linda-example-{}", std::process::id());
    let ts = Space::open(&name)?;
    ts.out(tuple!("sum", 0))?;

    // Workers are forks of this (single-threaded) process: start them first.
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(ts.eval(|ts| {
            let any4 = pattern!(
                FieldKind::I64,
                FieldKind::I64,
                FieldKind::I64,
                FieldKind::I64
            );
            // A real worker would loop forever; this one leaves when idle.
            while let Some(t) = ts.take(&any4, Duration::from_millis(300)).unwrap() {
                let n: i64 = t.fields().iter().filter_map(|f| f.as_i64()).sum();
                std::thread::sleep(Duration::from_millis(50)); // "complex calculation"
                let s = ts
                    .take(&pattern!("sum", _), Duration::MAX)
                    .unwrap()
                    .unwrap();
                ts.out(tuple!("sum", s.i64(1).unwrap() + n)).unwrap();
            }
        })?);
    }
    workers.push(ts.eval(|_| panic!("this worker fails on purpose"))?);

    ts.out(tuple!(1, 2, 3, 4))?;
    ts.out(tuple!(4, 5, 6, 7))?;
    ts.out(tuple!(3, 4, 5, 2))?;

    for w in &mut workers {
        let status = w.join()?;
        println!("worker {} exited: {status}", w.pid());
    }
    let sum = ts.take(&pattern!("sum", _), Duration::from_secs(5))?;
    println!("sum: {sum:?}");
    while let Some(e) = ts.try_take(&pattern!("error", FieldKind::Str))? {
        println!("error tuple: {:?}", e.str(1));
    }
    match ts.take(&pattern!("sum", _), Duration::from_millis(200))? {
        None => println!("no more sums"),
        Some(t) => println!("unexpected: {t:?}"),
    }
    drop(ts);
    Space::unlink(&name)
}
