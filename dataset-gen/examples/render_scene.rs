//! Renders one flower-world scene to a PNG and prints its caption:
//! `cargo run --release -p ip2p-dataset-gen --example render_scene -- <seed> <out.png> [w h]`.
//! `<seed>` is a held-out index (`held_out_seed`: a stream no training run draws), or
//! `sunflowers`: the first held-out scene of four or more sunflowers on grass under a day sky
//! without a sun, which is `assets/sunflowers.png`.

use dataset_gen::world::{held_out_seed, Ground, Kind, Scene, Sky};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [index, out, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: render_scene <held-out index | sunflowers> <out.png> [width height]".into(),
        );
    };
    let (w, h) = match rest {
        [w, h] => (w.parse()?, h.parse()?),
        _ => (256, 192),
    };
    let index: usize = match index.as_str() {
        // The first held-out scene of sunflowers on grass under a day sky without a sun.
        "sunflowers" => (0..10_000)
            .find(|&i| {
                let s = Scene::random(held_out_seed(i));
                s.kind == Kind::Sunflower
                    && s.sky == Sky::Day
                    && s.ground == Ground::Grass
                    && s.orb.is_none()
                    && s.flowers.len() >= 4
            })
            .ok_or("no such scene")?,
        i => i.parse()?,
    };
    eprintln!("held-out scene {index}");
    let scene = Scene::random(held_out_seed(index));
    scene.render(w, h).save(out)?;
    println!("{}", scene.caption());
    Ok(())
}
