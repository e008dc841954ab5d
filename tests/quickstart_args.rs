//! The quickstart's command line (examples/common/quickstart_args.rs): defaults, and values out
//! of range refused with a message naming the flag and the value (they used to be clamped:
//! `--epochs -1` ran 1 epoch, `--classes 0` ran 2 classes).

#[path = "../examples/common/train.rs"]
mod train;
// USAGE and the constants are the quickstart's; the test reads only the parser.
#[allow(dead_code)]
#[path = "../examples/common/quickstart_args.rs"]
mod quickstart_args;

use quickstart_args::{parse, spec_of, Args, Command};

fn run(args: &[&str]) -> Result<Args, String> {
    match parse(args.iter().map(|s| s.to_string()))? {
        Command::Run(a) => Ok(a),
        Command::Help => panic!("{args:?} parsed as --help"),
    }
}

fn refused(args: &[&str], parts: &[&str]) {
    let msg = match run(args) {
        Ok(a) => match spec_of(&a) {
            Ok(spec) => panic!("{args:?} was accepted: {a:?}, {spec:?}"),
            Err(msg) => msg,
        },
        Err(msg) => msg,
    };
    for p in parts {
        assert!(
            msg.contains(p),
            "{args:?}: message {msg:?} does not mention {p:?}"
        );
    }
}

#[test]
fn defaults_parse_and_give_the_documented_spec() {
    let a = run(&[]).unwrap();
    assert_eq!(
        (a.classes, a.per_class, a.epochs, a.seed),
        (300, 20, 20, 42)
    );
    let spec = spec_of(&a).unwrap();
    assert_eq!((spec.s, spec.m2), (30.0, 0.5));
    let a = run(&[
        "--epochs",
        "1",
        "--classes",
        "2",
        "--per-class",
        "5",
        "--scale",
        "64",
    ])
    .unwrap();
    assert_eq!((a.epochs, a.classes, a.per_class), (1, 2, 5));
    assert_eq!(spec_of(&a).unwrap().s, 64.0);
    assert!(matches!(parse(["--help".to_string()]), Ok(Command::Help)));
}

#[test]
fn out_of_range_values_are_refused_naming_flag_and_value() {
    refused(&["--epochs", "-1"], &["--epochs", "\"-1\"", ">= 1"]);
    refused(&["--epochs", "0"], &["--epochs", "\"0\""]);
    refused(&["--epochs", "2.5"], &["--epochs", "\"2.5\""]);
    refused(&["--classes", "0"], &["--classes", "\"0\"", ">= 2"]);
    refused(&["--classes", "1"], &["--classes", "\"1\""]);
    refused(&["--per-class", "4"], &["--per-class", "\"4\"", ">= 5"]);
    refused(&["--seed", "-3"], &["--seed", "\"-3\""]);
    refused(&["--scale", "abc"], &["--scale", "\"abc\""]);
    refused(&["--scale", "0"], &["--scale", "s = 0"]);
    refused(&["--m2", "-0.5"], &["--m2", "m2 = -0.5"]);
    refused(&["--loss", "softmax"], &["--loss", "\"softmax\""]);
    refused(&["--device", "tpu"], &["--device", "\"tpu\""]);
    refused(&["--dtype", "f64"], &["--dtype", "\"f64\""]);
    refused(&["--epochs"], &["--epochs needs a value"]);
    refused(&["--bogus", "1"], &["\"--bogus\""]);
}

#[test]
fn every_loss_name_gives_its_variant() {
    use fused_margin::Variant;
    for (name, want) in [
        ("subcenter", "sub-center"),
        ("adaface", "AdaFace"),
        ("curricular", "CurricularFace"),
        ("magface", "MagFace"),
        ("elastic", "ElasticFace"),
        ("arcface", "plain"),
    ] {
        let spec = spec_of(&run(&["--loss", name]).unwrap()).unwrap();
        assert_eq!(spec.variant.name(), want, "--loss {name}");
        assert_eq!(spec.s, 30.0, "--loss {name}: the quickstart's scale");
    }
    assert!(matches!(
        spec_of(&run(&["--loss", "subcenter"]).unwrap())
            .unwrap()
            .variant,
        Variant::SubCenter { k: 3 }
    ));
    // A per-row-margin loss refuses a spec margin, naming the flag.
    refused(&["--loss", "adaface", "--m2", "0.5"], &["--m2", "m2 = 0.5"]);
}
