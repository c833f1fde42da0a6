//! The engine and the decoder seam with the real model: determinism, stop strings, `n` choices,
//! cancellation, concurrent requests, and a second (multi-sequence) decoder written here.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use tilt::decode::{self, Generation};
use tilt::engine::{
    Cx, Decoder, Engine, EngineOptions, Event, FinishReason, Flow, Outputs, SeqId, Usage,
};
use tilt::model::{Logits, Model, Role, BASE};
use tilt::sampling::{argmax, SamplingParams};

fn engine() -> Engine {
    // Each test gets its own engine over a freshly loaded model: engines own their models.
    let model = Model::load(&common::model_path(), "smollm2", Role::Base).unwrap();
    Engine::start(vec![model], EngineOptions::default())
}

fn generation(
    engine: &Engine,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingParams,
) -> Generation {
    let prompt = engine.base().vocab.encode(prompt, false).unwrap();
    Generation {
        prompt,
        max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        n: 1,
        sampling,
        model_prompts: Default::default(),
    }
}

#[derive(Debug, Default)]
struct Collected {
    text: Vec<String>,
    tokens: Vec<Vec<u32>>,
    finish: Vec<Option<FinishReason>>,
    usage: Option<Usage>,
    report: Option<serde_json::Value>,
}

fn run(engine: &Engine, decoder: Box<dyn Decoder>) -> Collected {
    let mut rx = engine.submit(decoder).unwrap();
    let mut c = Collected::default();
    let grow = |c: &mut Collected, i: usize| {
        while c.text.len() <= i {
            c.text.push(String::new());
            c.tokens.push(Vec::new());
            c.finish.push(None);
        }
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                grow(&mut c, t.choice);
                c.text[t.choice].push_str(&t.text);
                c.tokens[t.choice].push(t.token);
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                grow(&mut c, choice);
                c.text[choice].push_str(&text);
                c.finish[choice] = Some(reason);
            }
            Event::Done { usage, report } => {
                c.usage = Some(usage);
                c.report = report;
                break;
            }
            Event::Failed(msg) => panic!("request failed: {msg}"),
            Event::Started { .. } | Event::Prompt(_) => {}
        }
    }
    c
}

fn sample(engine: &Engine, g: Generation) -> Collected {
    run(engine, decode::build("sample", g, engine.models()).unwrap())
}

#[test]
fn greedy_is_deterministic_and_seeds_repeat() {
    let e = engine();
    let g = generation(
        &e,
        "The best way to learn a language is",
        24,
        SamplingParams::greedy(),
    );
    let a = sample(&e, g.clone());
    let b = sample(&e, g.clone());
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens[0].len(), 24);
    assert_eq!(a.finish[0], Some(FinishReason::Length));
    assert_eq!(
        a.usage,
        Some(Usage {
            prompt_tokens: g.prompt.len(),
            completion_tokens: 24
        })
    );

    let seeded = |seed| {
        let s = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        sample(&e, generation(&e, "My favourite animal is", 20, s)).tokens
    };
    assert_eq!(seeded(11), seeded(11), "same seed, same output");
    assert_ne!(seeded(11), seeded(12), "another seed, another output");
}

#[test]
fn n_choices_share_the_prompt_and_differ() {
    let e = engine();
    let s = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..Default::default()
    };
    let mut g = generation(&e, "Name a colour:", 12, s);
    g.n = 3;
    let c = sample(&e, g.clone());
    assert_eq!(c.tokens.len(), 3);
    assert!(c.finish.iter().all(Option::is_some));
    assert!(
        c.tokens[0] != c.tokens[1] || c.tokens[1] != c.tokens[2],
        "independent RNG streams"
    );
    let total: usize = c.tokens.iter().map(Vec::len).sum();
    assert_eq!(c.usage.unwrap().completion_tokens, total);
    // Choice 0 of n equals the single choice with the same seed.
    let mut single = g;
    single.n = 1;
    assert_eq!(sample(&e, single).tokens[0], c.tokens[0]);
}

#[test]
fn stop_string_split_across_tokens() {
    let e = engine();
    let g = generation(
        &e,
        "Count: one, two, three, four, five,",
        30,
        SamplingParams::greedy(),
    );
    let free = sample(&e, g.clone());
    let vocab = &e.base().vocab;
    // Find a stop string that spans a token boundary in the greedy output.
    let toks = &free.tokens[0];
    let (k, stop) = (1..toks.len())
        .find_map(|k| {
            let before = vocab.decode(&toks[k - 1..k]);
            let after = vocab.decode(&toks[k..k + 1]);
            let (b, a) = (before.trim_start(), after.trim_end());
            (b.len() >= 2 && !a.is_empty())
                .then(|| (k, format!("{}{}", &b[b.len() - 1..], &a[..1])))
        })
        .expect("a boundary to split");
    let mut stopped = g;
    stopped.stop = vec![stop.clone()];
    let c = sample(&e, stopped);
    let full = &free.text[0];
    let at = full.find(&stop).unwrap();
    assert_eq!(
        c.text[0],
        full[..at],
        "text ends right before the stop string {stop:?} (boundary at token {k})"
    );
    assert_eq!(c.finish[0], Some(FinishReason::Stop));
}

#[test]
fn end_of_generation_stops_and_adds_no_text() {
    let e = engine();
    let vocab = &e.base().vocab;
    let text = e
        .base()
        .chat
        .render(&[tilt::model::Message {
            role: "user".into(),
            content: "Say hi.".into(),
        }])
        .unwrap();
    let mut g = generation(&e, &text, 200, SamplingParams::greedy());
    let c = sample(&e, g.clone());
    assert_eq!(c.finish[0], Some(FinishReason::Stop));
    assert!(vocab
        .end_of_generation
        .contains(c.tokens[0].last().unwrap()));
    assert!(!c.text[0].contains("<|im_end|>"));
    // ignore_eos runs to exactly max_tokens.
    g.ignore_eos = true;
    g.max_tokens = c.tokens[0].len() + 5;
    let long = sample(&e, g.clone());
    assert_eq!(long.tokens[0].len(), g.max_tokens);
    assert_eq!(long.finish[0], Some(FinishReason::Length));
}

#[test]
fn dropping_the_receiver_cancels() {
    let e = engine();
    let mut g = generation(
        &e,
        "Write a very long story:",
        5000,
        SamplingParams::greedy(),
    );
    g.ignore_eos = true;
    let mut rx = e
        .submit(decode::build("sample", g, e.models()).unwrap())
        .unwrap();
    let mut seen = 0;
    while seen < 3 {
        if let Some(Event::Token(_)) = rx.blocking_recv() {
            seen += 1;
        }
    }
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.load.running.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled request is still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The engine still serves.
    let c = sample(&e, generation(&e, "Hi", 3, SamplingParams::greedy()));
    assert_eq!(c.tokens[0].len(), 3);
}

#[test]
fn two_clients_are_served_together() {
    let e = engine();
    let mut long = generation(&e, "Tell me about rivers.", 60, SamplingParams::greedy());
    long.ignore_eos = true;
    let alone = sample(&e, long.clone());
    let mut a = e
        .submit(decode::build("sample", long, e.models()).unwrap())
        .unwrap();
    // Wait until the first is generating, then start a second one alongside.
    let first = loop {
        if let Some(Event::Token(t)) = a.blocking_recv() {
            break t.token;
        }
    };
    let short = generation(&e, "Tell me about lakes.", 5, SamplingParams::greedy());
    let mut b = e
        .submit(decode::build("sample", short, e.models()).unwrap())
        .unwrap();
    let mut a_tokens_when_b_done = 0;
    let mut b_done = false;
    let mut a_tokens = vec![first];
    loop {
        if !b_done {
            while let Ok(ev) = b.try_recv() {
                b_done |= matches!(ev, Event::Done { .. });
            }
            if b_done {
                a_tokens_when_b_done = a_tokens.len();
            }
        }
        match a.blocking_recv() {
            Some(Event::Token(t)) => a_tokens.push(t.token),
            Some(Event::Done { .. }) | None => break,
            _ => {}
        }
    }
    while !b_done {
        b_done = matches!(b.blocking_recv(), Some(Event::Done { .. }) | None);
        a_tokens_when_b_done = a_tokens.len();
    }
    assert_eq!(
        a_tokens, alone.tokens[0],
        "batching does not change a greedy result"
    );
    assert!(
        a_tokens_when_b_done < 60,
        "the short request finished while the long one was still running"
    );
}

/// A second decoder, multi-sequence: branch on the two most likely first tokens, continue each
/// greedily, and answer with the branch of higher total log-probability.
struct BestOfTwoBranches {
    prompt: Vec<u32>,
    len: usize,
    root: Option<SeqId>,
    branches: Vec<(SeqId, Vec<u32>, f32)>,
    tickets: Vec<usize>,
}

impl Decoder for BestOfTwoBranches {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        self.tickets.clear();
        if self.root.is_none() {
            let root = cx.new_seq(BASE);
            self.root = Some(root);
            self.tickets
                .push(cx.forward(root, self.prompt.clone(), Logits::Last)?);
            return Ok(());
        }
        for (seq, toks, _) in &self.branches {
            self.tickets
                .push(cx.forward(*seq, vec![*toks.last().unwrap()], Logits::Last)?);
        }
        Ok(())
    }

    fn absorb(&mut self, cx: &mut Cx, out: &Outputs) -> Result<Flow> {
        let logprobs = |row: &[f32]| {
            let mut r = row.to_vec();
            tilt::sampling::log_softmax(&mut r);
            r
        };
        if self.branches.is_empty() {
            let lp = logprobs(out.last(self.tickets[0])?);
            let root = self.root.unwrap();
            let mut top = tilt::sampling::top_n(&lp, 2);
            top.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
            let second = cx.fork(root)?;
            self.branches = vec![
                (root, vec![top[0]], lp[top[0] as usize]),
                (second, vec![top[1]], lp[top[1] as usize]),
            ];
            return Ok(Flow::Continue);
        }
        for (i, (_, toks, score)) in self.branches.iter_mut().enumerate() {
            let lp = logprobs(out.last(self.tickets[i])?);
            let t = argmax(&lp);
            *score += lp[t as usize];
            toks.push(t);
        }
        if self.branches[0].1.len() < self.len {
            return Ok(Flow::Continue);
        }
        let best = if self.branches[0].2 >= self.branches[1].2 {
            0
        } else {
            1
        };
        let vocab = &cx.model(BASE).vocab;
        let text = vocab.decode(&self.branches[best].1);
        for (j, &token) in self.branches[best].1.iter().enumerate() {
            let text = if j == 0 { text.clone() } else { String::new() };
            cx.emit(Event::Token(tilt::engine::TokenEvent {
                choice: 0,
                token,
                text,
                logprob: None,
                top: Vec::new(),
            }));
        }
        cx.emit(Event::Finished {
            choice: 0,
            reason: FinishReason::Length,
            text: String::new(),
        });
        let scores: Vec<f32> = self.branches.iter().map(|b| b.2).collect();
        cx.emit(Event::Done {
            usage: Usage { prompt_tokens: self.prompt.len(), completion_tokens: self.len },
            report: Some(serde_json::json!({"decoder": "best_of_two_branches", "scores": scores, "chosen": best})),
        });
        Ok(Flow::Done)
    }
}

#[test]
fn a_multi_sequence_decoder_plugs_into_the_same_seam() {
    let e = engine();
    let prompt = e
        .base()
        .vocab
        .encode("The weather today is", false)
        .unwrap();
    let len = 8;
    let d = BestOfTwoBranches {
        prompt: prompt.clone(),
        len,
        root: None,
        branches: Vec::new(),
        tickets: Vec::new(),
    };
    // Run it beside a plain request to show both batch together.
    let mut plain = e
        .submit(
            decode::build(
                "sample",
                generation(&e, "Hello", 16, SamplingParams::greedy()),
                e.models(),
            )
            .unwrap(),
        )
        .unwrap();
    let c = run(&e, Box::new(d));
    while !matches!(plain.blocking_recv(), Some(Event::Done { .. }) | None) {}
    let report = c.report.unwrap();
    let scores: Vec<f64> = report["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let chosen = report["chosen"].as_u64().unwrap() as usize;
    assert!(scores[chosen] >= scores[1 - chosen]);
    assert_eq!(c.tokens[0].len(), len);
    // Branch 0 is plain greedy decoding: when it wins, the output equals the greedy sample.
    let greedy = sample(
        &e,
        Generation {
            prompt,
            max_tokens: len,
            stop: vec![],
            ignore_eos: true,
            n: 1,
            sampling: SamplingParams::greedy(),
            model_prompts: Default::default(),
        },
    );
    if chosen == 0 {
        assert_eq!(c.tokens[0], greedy.tokens[0]);
    } else {
        assert_ne!(c.tokens[0][0], greedy.tokens[0][0]);
    }
}

/// A decoder with a bug: it panics once it has logits.
struct Panics(Option<SeqId>);

impl Decoder for Panics {
    fn plan(&mut self, cx: &mut Cx) -> Result<()> {
        let seq = *self.0.get_or_insert_with(|| cx.new_seq(BASE));
        cx.forward(seq, vec![1, 2, 3], Logits::Last)?;
        Ok(())
    }

    fn absorb(&mut self, _: &mut Cx, _: &Outputs) -> Result<Flow> {
        panic!("decoder bug");
    }
}

#[test]
fn a_panicking_decoder_fails_its_request_and_the_engine_lives_on() {
    let e = engine();
    let mut plain = e
        .submit(
            decode::build(
                "sample",
                generation(&e, "Hello", 12, SamplingParams::greedy()),
                e.models(),
            )
            .unwrap(),
        )
        .unwrap();
    let mut rx = e.submit(Box::new(Panics(None))).unwrap();
    let failure = loop {
        match rx.blocking_recv() {
            Some(Event::Failed(msg)) => break msg,
            Some(_) => {}
            None => panic!("the request ended without a failure event"),
        }
    };
    assert!(failure.to_string().contains("decoder bug"), "{failure}");
    // The request beside it finishes normally, and new ones are served.
    while !matches!(plain.blocking_recv(), Some(Event::Done { .. })) {}
    assert_eq!(
        sample(&e, generation(&e, "Hi", 3, SamplingParams::greedy())).tokens[0].len(),
        3
    );
}
