//! A run over one shard: captions → (LLM) triples → (SD + CLIP) rows → Parquet parts.
//!
//! Work is cut into *parts* of `items_per_part` consecutive items of the shard. A part is the
//! unit of commit: its Parquet file is written atomically, then a line in the shard's ledger
//! says it is done. Every sample is a function of the run seed and the item's index, so a part
//! redone after a crash is identical to the one that was lost; a part file without a ledger
//! line is simply overwritten. The text stage logs every LLM answer as it arrives, so a resume
//! never asks twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use futures::StreamExt;
use ip2p::loader::{self, HubOptions, LoadOptions, ModelDir};
use ip2p::pipeline::clip_score::ClipScorer;
use ip2p::pipeline::Txt2ImgPipeline;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{JsonlLog, Lock};
use crate::input::{read_inputs, shard_items, InputStats, Item, Triple};
use crate::llm::{EditWriter, LlmConfig, Reject};
use crate::output::write_part;
use crate::render::{ImageConfig, ItemResult, PairGenerator};
use crate::retry::RetryCounts;
use crate::world::{self, World, WorldGenerator};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub inputs: Vec<PathBuf>,
    pub caption_column: Option<String>,
    /// Use only the first `limit` items of the input (after de-duplication).
    pub limit: Option<usize>,
    pub out: PathBuf,
    pub shard: usize,
    pub num_shards: usize,
    pub items_per_part: usize,
    /// `None`: every input must already be a triple.
    pub llm: Option<LlmConfig>,
    pub llm_concurrency: usize,
    /// A Stable Diffusion 1.x folder or hub id.
    pub model: String,
    /// LoRA files with their scales and Textual Inversion embeddings for the Stable Diffusion
    /// model (a style or subject the renders should have).
    pub loras: Vec<ip2p::loader::lora::LoraSpec>,
    pub embeddings: Vec<ip2p::loader::embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork and its strength for the Stable Diffusion model.
    pub hypernetwork: Option<ip2p::loader::hypernetwork::HypernetworkSpec>,
    /// A CLIP folder or hub id.
    pub clip: String,
    pub hub: HubOptions,
    pub device: Device,
    pub image: ImageConfig,
    /// Progress bars (on a terminal) instead of log lines.
    pub progress_bars: bool,
    /// Make the dataset from a procedural world instead of inputs, an LLM and renders:
    /// `(world, examples)`. The shards, parts, ledger and resume work as for any run.
    pub world: Option<(World, usize)>,
}

/// A text-stage result: the triple, or why there is none.
type TextOutcome = std::result::Result<Triple, Reject>;
/// A part's number and its items with their text outcomes.
type PartJob = (usize, Vec<(Item, TextOutcome)>);

/// What a rerun must agree on, stored beside the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world: Option<World>,
    num_shards: usize,
    items_per_part: usize,
    model: String,
    /// The LoRAs (`file:scale`), embeddings (`file:token`) and hypernetwork the renders used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    personal: Vec<String>,
    clip: String,
    image: ImageConfig,
}

/// One committed part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartEntry {
    pub part: usize,
    pub file: String,
    pub items: Vec<usize>,
    pub rows: usize,
    pub rendered: usize,
    pub passed: usize,
}

/// One text-stage answer (the `input`/`edit`/`output` fields follow the paper's format, so the
/// log can be fed back as an input).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TextEntry {
    index: usize,
    input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reject: Option<Reject>,
}

impl TextEntry {
    fn outcome(&self) -> TextOutcome {
        match (&self.edit, &self.output, self.reject) {
            (Some(e), Some(o), None) => Ok(Triple {
                input: self.input.clone(),
                edit: e.clone(),
                output: o.clone(),
            }),
            (_, _, r) => Err(r.unwrap_or(Reject::InvalidJson)),
        }
    }
}

/// Counts of the text stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TextSummary {
    /// Items that came as triples.
    pub given: usize,
    /// Answers reused from an earlier (interrupted) run.
    pub cached: usize,
    /// LLM requests made in this run.
    pub requested: usize,
    pub ok: usize,
    pub rejected: BTreeMap<String, usize>,
    pub retries: RetryCounts,
    pub seconds: f64,
    pub captions_per_second: f64,
}

/// Counts of the image stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageSummary {
    pub parts_written: usize,
    pub parts_already_done: usize,
    pub triples: usize,
    pub samples_rendered: usize,
    pub samples_passed: usize,
    pub rows: usize,
    pub filtered: BTreeMap<String, usize>,
    pub render_seconds: f64,
    pub clip_seconds: f64,
    pub encode_seconds: f64,
    pub write_seconds: f64,
    pub pairs_per_second: f64,
}

/// The run's summary (also written to `summary/shard-…json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub shard: usize,
    pub num_shards: usize,
    pub inputs: InputStats,
    pub items_total: usize,
    pub items_in_shard: usize,
    pub text: TextSummary,
    pub images: ImageSummary,
    pub dataset_rows: usize,
    pub dataset_parts: usize,
    pub seconds: f64,
}

fn shard_tag(shard: usize, n: usize) -> String {
    format!("shard-{shard:05}-of-{n:05}")
}

/// File name of part `part` of a shard.
pub fn part_name(shard: usize, n: usize, part: usize) -> String {
    format!("{}-part-{part:05}.parquet", shard_tag(shard, n))
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

/// Messages from the image worker.
enum Event {
    Part(PartEntry, Box<ItemResult>, Duration),
}

/// Loads SD and CLIP and returns a pair generator.
/// What renders the pairs of a run.
#[derive(Debug)]
pub enum Generator {
    /// Stable Diffusion with Prompt-to-Prompt, filtered by CLIP.
    Diffusion(Box<PairGenerator>),
    /// A procedural world's exact pairs.
    World(WorldGenerator),
}

impl Generator {
    /// The rows of item `index`, whose triple is `t`.
    pub fn generate(&self, index: usize, t: &Triple) -> Result<ItemResult> {
        match self {
            Self::Diffusion(g) => g.generate(index, t),
            Self::World(g) => g.generate(index, t),
        }
    }
}

/// The run's pair renderer: the world's, or Stable Diffusion and CLIP loaded.
pub fn load_generator(cfg: &RunConfig) -> Result<Generator> {
    if cfg.world.is_some() {
        return Ok(Generator::World(WorldGenerator {
            run_seed: cfg.image.seed,
            width: cfg.image.width,
            height: cfg.image.height,
        }));
    }
    Ok(Generator::Diffusion(Box::new(load_diffusion(cfg)?)))
}

fn load_diffusion(cfg: &RunConfig) -> Result<PairGenerator> {
    let dir = ModelDir::open(&cfg.model, &cfg.hub)?;
    let opts = LoadOptions {
        loras: cfg.loras.clone(),
        embeddings: cfg.embeddings.clone(),
        hypernetwork: cfg.hypernetwork.clone(),
        ..Default::default()
    };
    let c = loader::load(&dir, &cfg.device, &opts)?;
    let pipe = Txt2ImgPipeline::new(c)?;
    let clip = ClipScorer::open(&cfg.clip, &cfg.hub, &cfg.device)?;
    Ok(PairGenerator::new(pipe, clip, cfg.image.clone()))
}

fn check_config(cfg: &RunConfig) -> Result<()> {
    if cfg.num_shards == 0 || cfg.shard >= cfg.num_shards {
        return Err(Error::Config(format!(
            "--shard {} is not below --num-shards {}",
            cfg.shard, cfg.num_shards
        )));
    }
    let im = &cfg.image;
    let finite = [im.guidance_min, im.guidance_max, im.p2p_min, im.p2p_max]
        .iter()
        .all(|v| v.is_finite());
    if !finite || im.guidance_min > im.guidance_max || im.p2p_min > im.p2p_max {
        return Err(Error::Config(
            "guidance and p2p ranges must be finite with min ≤ max".into(),
        ));
    }
    if !(0.0..=1.0).contains(&im.p2p_min) || !(0.0..=1.0).contains(&im.p2p_max) {
        return Err(Error::Config("p2p thresholds must lie in [0, 1]".into()));
    }
    if im.samples == 0 || im.keep == 0 || im.steps == 0 || cfg.items_per_part == 0 {
        return Err(Error::Config(
            "samples, keep, steps and items per part must be positive".into(),
        ));
    }
    Ok(())
}

/// Checks that a resumed shard was started with the same settings, or records them.
fn check_identity(cfg: &RunConfig, path: &Path) -> Result<()> {
    let identity = Identity {
        world: cfg.world.map(|w| w.0),
        num_shards: cfg.num_shards,
        items_per_part: cfg.items_per_part,
        model: cfg.model.clone(),
        personal: cfg
            .loras
            .iter()
            .map(|l| format!("lora {}:{}", l.path.display(), l.scale))
            .chain(cfg.embeddings.iter().map(|e| {
                format!(
                    "embedding {}:{}",
                    e.path.display(),
                    e.token.clone().unwrap_or_default()
                )
            }))
            .chain(
                cfg.hypernetwork
                    .iter()
                    .map(|h| format!("hypernetwork {}:{}", h.path.display(), h.strength)),
            )
            .collect(),
        clip: cfg.clip.clone(),
        image: cfg.image.clone(),
    };
    if !path.is_file() {
        let json =
            serde_json::to_vec_pretty(&identity).map_err(|e| Error::Config(e.to_string()))?;
        return Ok(ip2p::fsutil::write_file(path, &json)?);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let old: Identity = serde_json::from_str(&text).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if old != identity {
        return Err(Error::Config(format!(
            "{} was started with other settings ({}); resume with the same settings or use a new --out",
            cfg.out.display(),
            path.display()
        )));
    }
    Ok(())
}

/// The shard's ledger: committed parts and every LLM answer so far.
struct Ledger {
    parts: JsonlLog,
    text: JsonlLog,
    done_parts: HashSet<usize>,
    answers: HashMap<usize, TextEntry>,
}

impl Ledger {
    fn open(dir: &Path, tag: &str) -> Result<Self> {
        let (parts, done): (JsonlLog, Vec<PartEntry>) =
            JsonlLog::open(&dir.join(format!("{tag}.parts.jsonl")))?;
        let (text, answered): (JsonlLog, Vec<TextEntry>) =
            JsonlLog::open(&dir.join(format!("{tag}.text.jsonl")))?;
        Ok(Self {
            parts,
            text,
            done_parts: done.iter().map(|p| p.part).collect(),
            answers: answered.into_iter().map(|t| (t.index, t)).collect(),
        })
    }
}

impl Summary {
    /// Counts a committed part (already in the ledger).
    fn record_part(&mut self, entry: &PartEntry, agg: &ItemResult, write: Duration) {
        let im = &mut self.images;
        im.parts_written += 1;
        im.triples += entry.items.len();
        im.samples_rendered += agg.rendered;
        im.samples_passed += agg.passed;
        im.rows += entry.rows;
        for r in &agg.filtered {
            *im.filtered.entry(r.as_str().to_owned()).or_default() += 1;
        }
        im.render_seconds += agg.render_time.as_secs_f64();
        im.clip_seconds += agg.clip_time.as_secs_f64();
        im.encode_seconds += agg.encode_time.as_secs_f64();
        im.write_seconds += write.as_secs_f64();
    }

    /// Counts one text-stage answer.
    fn record_text(&mut self, source: Source, outcome: &TextOutcome) {
        match source {
            Source::Given => self.text.given += 1,
            Source::Cached => self.text.cached += 1,
            Source::Asked => self.text.requested += 1,
        }
        match outcome {
            Ok(_) if source != Source::Given => self.text.ok += 1,
            Ok(_) => {}
            Err(r) => *self.text.rejected.entry(r.as_str().to_owned()).or_default() += 1,
        }
    }
}

/// Renders, filters and writes one part on the image worker: its ledger entry and counts as an
/// event (with the time the write took).
fn render_part(
    gen: &Generator,
    cfg: &RunConfig,
    part: usize,
    batch: &[(Item, TextOutcome)],
) -> Result<Event> {
    let mut agg = ItemResult::default();
    let mut rows = Vec::new();
    for (item, outcome) in batch {
        let Ok(triple) = outcome else { continue };
        let r = gen.generate(item.index, triple)?;
        agg.rendered += r.rendered;
        agg.passed += r.passed;
        agg.filtered.extend(r.filtered);
        agg.render_time += r.render_time;
        agg.clip_time += r.clip_time;
        agg.encode_time += r.encode_time;
        rows.extend(r.rows);
    }
    let name = part_name(cfg.shard, cfg.num_shards, part);
    let t = Instant::now();
    write_part(&cfg.out.join("data").join(&name), &rows)?;
    let write = t.elapsed();
    let entry = PartEntry {
        part,
        file: format!("data/{name}"),
        items: batch.iter().map(|(i, _)| i.index).collect(),
        rows: rows.len(),
        rendered: agg.rendered,
        passed: agg.passed,
    };
    agg.rows = rows;
    Ok(Event::Part(entry, Box::new(agg), write))
}

/// The image worker: one thread owns the models; parts arrive over a bounded channel and
/// leave, written, as events.
fn spawn_image_worker(
    cfg: &RunConfig,
    mut jobs: tokio::sync::mpsc::Receiver<PartJob>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("dataset-gen-images".into())
        .spawn(move || -> Result<()> {
            let gen = load_generator(&cfg)?;
            while let Some((k, batch)) = jobs.blocking_recv() {
                if events.send(render_part(&gen, &cfg, k, &batch)?).is_err() {
                    break;
                }
            }
            Ok(())
        })
        .map_err(|e| Error::Worker(e.to_string()))
}

/// What the text stage feeds and the image worker reports into.
struct Flow<'a> {
    summary: Summary,
    ledger: Ledger,
    bars: &'a Bars,
    /// `None` once the text stage is over (the worker then ends after the last part).
    jobs: Option<tokio::sync::mpsc::Sender<PartJob>>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
}

impl Flow<'_> {
    fn handle(&mut self, ev: Event) -> Result<()> {
        let Event::Part(entry, agg, write) = ev;
        self.ledger.parts.append(&entry)?;
        self.summary.record_part(&entry, &agg, write);
        self.bars.part_done(&entry);
        Ok(())
    }

    /// Applies every event that has arrived.
    fn drain_ready(&mut self) -> Result<()> {
        while let Ok(ev) = self.events.try_recv() {
            self.handle(ev)?;
        }
        Ok(())
    }

    /// Hands a complete part to the worker, applying finished parts while the queue is full.
    /// `false`: the worker has stopped.
    async fn send(&mut self, job: PartJob) -> Result<bool> {
        use tokio::sync::mpsc::error::TrySendError;
        let mut job = job;
        loop {
            let Some(jobs) = &self.jobs else {
                return Ok(false);
            };
            match jobs.try_send(job) {
                Ok(()) => return Ok(true),
                Err(TrySendError::Closed(_)) => return Ok(false),
                Err(TrySendError::Full(j)) => match self.events.recv().await {
                    Some(ev) => {
                        self.handle(ev)?;
                        job = j;
                    }
                    None => return Ok(false),
                },
            }
        }
    }

    /// Logs an answer the LLM gave in this run.
    fn log_answer(&mut self, it: &Item, outcome: &TextOutcome) -> Result<()> {
        self.ledger.text.append(&TextEntry {
            index: it.index,
            input: it.caption.clone(),
            edit: outcome.as_ref().ok().map(|t| t.edit.clone()),
            output: outcome.as_ref().ok().map(|t| t.output.clone()),
            reject: outcome.as_ref().err().copied(),
        })?;
        self.bars.text_done();
        Ok(())
    }
}

/// Waits for the image worker to finish.
async fn join_worker(worker: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    let r = tokio::task::spawn_blocking(move || worker.join())
        .await
        .map_err(|e| Error::Worker(e.to_string()))?;
    match r {
        Ok(r) => r,
        Err(_) => Err(Error::Worker("the image thread panicked".into())),
    }
}

/// The run's items (a world's examples, or the inputs read), cut to `--limit`.
fn run_items(cfg: &RunConfig) -> Result<(Vec<Item>, InputStats)> {
    let (mut items, inputs) = match cfg.world {
        Some((_, count)) => (world::items(cfg.image.seed, count), InputStats::default()),
        None => read_inputs(&cfg.inputs, cfg.caption_column.as_deref())?,
    };
    if let Some(n) = cfg.limit {
        items.truncate(n);
    }
    Ok((items, inputs))
}

/// The LLM client when `needs` captions still need an edit written.
fn edit_writer(cfg: &RunConfig, needs: usize) -> Result<Option<EditWriter>> {
    match (&cfg.llm, needs) {
        (_, 0) => Ok(None),
        (Some(l), _) => Ok(Some(EditWriter::new(l.clone())?)),
        (None, n) => Err(Error::Config(format!(
            "{n} captions need an edit written: configure the LLM (--llm-model, --llm-base-url)"
        ))),
    }
}

/// Runs (or resumes) one shard.
pub async fn run(cfg: RunConfig) -> Result<Summary> {
    check_config(&cfg)?;
    let started = Instant::now();
    let (items, inputs) = run_items(&cfg)?;
    let items_total = items.len();
    let items = shard_items(&items, cfg.shard, cfg.num_shards);
    let tag = shard_tag(cfg.shard, cfg.num_shards);
    let ledger_dir = cfg.out.join("ledger");
    for d in ["data", "ledger", "summary"] {
        mkdir(&cfg.out.join(d))?;
    }
    let _lock = Lock::acquire(&ledger_dir.join(format!("{tag}.lock")))?;
    // The run's identity: a resume with other settings would mix two datasets.
    check_identity(&cfg, &ledger_dir.join(format!("{tag}.settings.json")))?;
    let mut ledger = Ledger::open(&ledger_dir, &tag)?;
    let mut summary = Summary {
        shard: cfg.shard,
        num_shards: cfg.num_shards,
        inputs,
        items_total,
        items_in_shard: items.len(),
        ..Default::default()
    };
    summary.images.parts_already_done = ledger.done_parts.len();
    let todo: Vec<(usize, Vec<Item>)> = items
        .chunks(cfg.items_per_part)
        .enumerate()
        .filter(|(k, _)| !ledger.done_parts.contains(k))
        .map(|(k, c)| (k, c.to_vec()))
        .collect();
    let needs_llm = todo
        .iter()
        .flat_map(|(_, it)| it)
        .filter(|it| it.triple.is_none() && !ledger.answers.contains_key(&it.index))
        .count();
    let writer = edit_writer(&cfg, needs_llm)?;
    let bars = Bars::new(
        cfg.progress_bars,
        needs_llm,
        todo.iter().map(|p| p.1.len()).sum(),
    );
    let (jobs, job_rx) = tokio::sync::mpsc::channel::<PartJob>(1);
    let (ev_tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    // No parts to make: no worker, and the event channel closes at once.
    let worker = if todo.is_empty() {
        drop(ev_tx);
        None
    } else {
        Some(spawn_image_worker(&cfg, job_rx, ev_tx)?)
    };
    let mut cached = std::mem::take(&mut ledger.answers);
    let mut flow = Flow {
        summary,
        ledger,
        bars: &bars,
        jobs: Some(jobs),
        events,
    };
    let text_started = Instant::now();
    text_stage(&cfg, &todo, &mut cached, writer.as_ref(), &mut flow).await?;
    let summary = &mut flow.summary;
    summary.text.seconds = text_started.elapsed().as_secs_f64();
    if let Some(w) = &writer {
        summary.text.retries = w.stats().snapshot();
    }
    if summary.text.requested > 0 && summary.text.seconds > 0.0 {
        summary.text.captions_per_second = summary.text.requested as f64 / summary.text.seconds;
    }
    flow.jobs = None;
    while let Some(ev) = flow.events.recv().await {
        flow.handle(ev)?;
    }
    if let Some(w) = worker {
        join_worker(w).await?;
    }
    bars.finish();
    finish_summary(flow.summary, &cfg, &ledger_dir, &tag, started)
}

/// The text stage, in item order (answers are awaited concurrently but consumed in order):
/// each part goes to the image worker as soon as its last answer is in.
async fn text_stage(
    cfg: &RunConfig,
    todo: &[(usize, Vec<Item>)],
    cached: &mut HashMap<usize, TextEntry>,
    writer: Option<&EditWriter>,
    flow: &mut Flow<'_>,
) -> Result<()> {
    let mut answers = futures::stream::iter(
        todo.iter()
            .flat_map(|(k, its)| its.iter().map(move |it| (*k, it.clone()))),
    )
    .map(|(k, it)| {
        let cached = cached.remove(&it.index);
        async move {
            if let Some(t) = it.triple.clone() {
                return (k, it, Ok(t), Source::Given);
            }
            if let Some(c) = cached {
                return (k, it, c.outcome(), Source::Cached);
            }
            let r = match writer {
                Some(w) => w.write(&it.caption).await,
                None => Err(Reject::RequestFailed),
            };
            (k, it, r, Source::Asked)
        }
    })
    .buffered(cfg.llm_concurrency.max(1));
    let expected: HashMap<usize, usize> = todo.iter().map(|(k, its)| (*k, its.len())).collect();
    let mut current: Option<PartJob> = None;
    while let Some((k, it, outcome, source)) = answers.next().await {
        if source == Source::Asked {
            flow.log_answer(&it, &outcome)?;
        }
        flow.summary.record_text(source, &outcome);
        let cur = current.get_or_insert_with(|| (k, Vec::new()));
        cur.1.push((it, outcome));
        if cur.1.len() == expected.get(&k).copied().unwrap_or(0) {
            let job = current
                .take()
                .ok_or_else(|| Error::Worker("no part".into()))?;
            if !flow.send(job).await? {
                break;
            }
        }
        flow.drain_ready()?;
    }
    Ok(())
}

/// Rates, the dataset's totals from the ledger, and the summary file (written whole).
fn finish_summary(
    mut summary: Summary,
    cfg: &RunConfig,
    ledger_dir: &Path,
    tag: &str,
    started: Instant,
) -> Result<Summary> {
    let im = &mut summary.images;
    let busy = im.render_seconds + im.clip_seconds;
    if busy > 0.0 {
        im.pairs_per_second = im.samples_rendered as f64 / busy;
    }
    let (_, all_parts): (JsonlLog, Vec<PartEntry>) =
        JsonlLog::open(&ledger_dir.join(format!("{tag}.parts.jsonl")))?;
    summary.dataset_parts = all_parts.len();
    summary.dataset_rows = all_parts.iter().map(|p| p.rows).sum();
    summary.seconds = started.elapsed().as_secs_f64();
    let path = cfg.out.join("summary").join(format!("{tag}.json"));
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
    ip2p::fsutil::write_file(&path, &json)?;
    Ok(summary)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Given,
    Cached,
    Asked,
}

/// Progress: bars on a terminal, log lines elsewhere.
struct Bars {
    text: Option<indicatif::ProgressBar>,
    items: Option<indicatif::ProgressBar>,
    started: Instant,
    items_done: std::cell::Cell<usize>,
    items_total: usize,
}

impl Bars {
    fn new(bars: bool, text_total: usize, items_total: usize) -> Self {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let make = |n: usize, prefix: &'static str| {
            let b = indicatif::ProgressBar::new(n as u64).with_style(style.clone());
            b.set_prefix(prefix);
            b
        };
        let (text, items) = if bars {
            let mp = indicatif::MultiProgress::new();
            (
                (text_total > 0).then(|| mp.add(make(text_total, "text"))),
                Some(mp.add(make(items_total, "triples"))),
            )
        } else {
            (None, None)
        };
        Self {
            text,
            items,
            started: Instant::now(),
            items_done: std::cell::Cell::new(0),
            items_total,
        }
    }

    fn text_done(&self) {
        if let Some(b) = &self.text {
            b.inc(1);
        }
    }

    fn part_done(&self, e: &PartEntry) {
        self.items_done.set(self.items_done.get() + e.items.len());
        match &self.items {
            Some(b) => b.inc(e.items.len() as u64),
            None => tracing::info!(
                part = e.part,
                rows = e.rows,
                rendered = e.rendered,
                passed = e.passed,
                done = self.items_done.get(),
                of = self.items_total,
                elapsed_s = self.started.elapsed().as_secs(),
                "part committed"
            ),
        }
    }

    fn finish(&self) {
        for b in [&self.text, &self.items].into_iter().flatten() {
            b.finish();
        }
    }
}
