"""Real text for the bank benchmarks: benchmark prompts, a caption grammar, and paraphrases.

- ``benchmark_prompts()``: VBench's 946 prompts (``VBench_full_info.json``) and PhyGenBench's 160
  captions (``prompts.json``), as this repository ships them (``evaluation/``); 1,089 distinct.
- ``grammar_captions(n, seed)``: OpenVid-style video captions, "<subject> <action> <place>,
  <time/light>, <camera>[, <style>]" in several sentence forms, from word lists below (about
  10^9 distinct combinations; every caption is a plain English sentence).
- ``paraphrase(text, rng)``: a varied rewording (a framing phrase, synonyms, a dropped
  modifier, clause order, case), what a user types for the same video.

Embedding these with a real sentence encoder (the all-MiniLM-L6-v2 model the toy world ships)
gives real-text embeddings; nothing here is random vectors.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = """a woman in a red dress|a man in a grey suit|a young girl with curly hair|an old man
with a white beard|a toddler|a group of teenagers|two friends|a couple|a chef|a street musician
|a ballet dancer|a surfer|a skateboarder|a cyclist|a runner|a firefighter|a police officer|a
doctor in a white coat|a farmer|a fisherman|a painter|a photographer|a businesswoman|a student
|a soldier|a knight in armour|an astronaut|a robot|a golden retriever|a black cat|a white
horse|a brown bear|a red fox|a wolf|a lion|a tiger|an elephant|a giraffe|a zebra|a panda|a
koala|a kangaroo|a penguin|an eagle|a flock of birds|a parrot|an owl|a swan|a duck|a goldfish
|a shark|a dolphin|a whale|a sea turtle|an octopus|a jellyfish|a butterfly|a bee|a spider|a
snail|a frog|a snake|a lizard|a squirrel|a rabbit|a hamster|a cow|a sheep|a goat|a pig|a
chicken|a red sports car|a yellow taxi|a city bus|a steam train|a bicycle|a motorcycle|a
sailboat|a fishing boat|a cargo ship|a hot air balloon|an airplane|a helicopter|a drone|a
rocket|a tractor|a fire truck|an ambulance|a kite|a paper boat|a wooden house|a lighthouse|a
castle|a windmill|a bridge|a waterfall|a river|a volcano|a glacier|a cactus|a sunflower|a
cherry tree|a field of tulips|a candle|a cup of coffee|a bowl of soup|a birthday cake|a
campfire|a snowman|a sandcastle|a clock tower|a neon sign|a fountain|a vintage camera|a
violin|a piano|a guitar|a chess board|a globe|a lantern|an umbrella|a teddy bear|a toy robot
|a basketball|a soccer ball|a tennis player|a boxer|a yoga instructor|a magician|a clown|a
mime|a DJ|a drummer|a singer|a crowd of fans|a family|a grandmother|a baby|a nurse|a
scientist|a pilot|a sailor|a cowboy|a monk|a shopkeeper|a waiter|a barista|a tailor|a
mechanic|a gardener|a beekeeper|a blacksmith|a potter|a baker""".replace("\n", " ").split("|")

ACTIONS = """walking|running|dancing|jumping|sitting|standing still|sleeping|eating|drinking
|laughing|crying|talking|singing|playing|swimming|flying|floating|spinning|climbing|falling
|rolling|sliding|driving|riding|reading a book|writing a letter|cooking|painting a picture
|taking photos|looking around|waving|clapping|stretching|practicing yoga|lifting weights
|juggling|playing the guitar|playing the piano|kicking a ball|throwing a frisbee|catching
a ball|chasing its tail|hunting|grazing|resting|yawning|shaking off water|digging|building
something|repairing a machine|cleaning|gardening|fishing|surfing a wave|skiing down a slope
|skating|diving|paddling|sailing|landing|taking off|crossing the road|waiting|hiding|peeking
out|turning around|moving slowly|moving quickly|approaching the camera|moving away from the
camera|circling|drifting|burning|melting|glowing|flickering|blooming|swaying in the wind
|splashing|pouring|boiling|exploding|collapsing|shattering|rising|sinking|bouncing
|unfolding|spreading its wings|wagging its tail|nodding|smiling""".replace("\n", " ").split("|")

PLACES = """on a beach|in a forest|in a desert|on a mountain top|in a snowy field|by a lake|on
a river bank|in the ocean|under water|in a city street|in a busy market|in a subway station
|at an airport|in a park|in a garden|in a kitchen|in a living room|in a bedroom|in an office
|in a classroom|in a library|in a museum|in a church|in a stadium|on a stage|in a studio|in
a warehouse|in a factory|on a farm|in a barn|in a vineyard|in a rice field|in a jungle|in a
cave|on an island|on a bridge|on a rooftop|in an alley|in a parking lot|on a highway|on a
country road|in a village|in a small town|in a shopping mall|in a restaurant|in a cafe|in a
bar|at a wedding|at a concert|at a festival|in a hospital|in a laboratory|in space|on the
moon|on mars|in a spaceship|in a castle hall|in ancient ruins|in a temple|at a harbour|on a
pier|in a swimming pool|on an ice rink|on a tennis court|on a basketball court|on a football
pitch|in a boxing ring|in a gym|in a dance hall|at a train station|in a tunnel|in a meadow
|in a canyon|by a waterfall|near a volcano|on a glacier|in a swamp|in the savanna|in the
arctic|in a bamboo grove|in a flower field|in front of a white wall|on a wooden table|on a
kitchen counter|in a glass jar|in the sky|above the clouds""".replace("\n", " ").split("|")

TIMES = """at sunset|at sunrise|at night|at dawn|at dusk|at noon|on a rainy day|on a foggy
morning|in the snow|during a storm|under a full moon|under neon lights|in soft morning light
|in golden hour light|in harsh sunlight|under a cloudy sky|in the autumn|in the spring|in
winter|in summer|by candlelight|under street lamps|in dim light|in bright daylight""".replace(
    "\n", " "
).split("|")

CAMERAS = """close-up shot|wide shot|aerial view|drone shot|tracking shot|handheld camera|slow
motion|time-lapse|static camera|low angle shot|high angle shot|panning shot|zoom in|zoom out
|first-person view|over-the-shoulder shot|macro shot|dolly shot|tilt shot|side view|top-down
view|fisheye lens|shallow depth of field|long shot""".replace("\n", " ").split("|")

STYLES = """cinematic|photorealistic|in the style of a watercolor painting|anime style|in the
style of Van Gogh|black and white|vintage film look|cyberpunk style|pixel art|oil painting
style|3D animation|claymation|documentary style|dreamy and soft|high contrast|pastel colours
|film noir|surreal|minimalist|vibrant colours|4k|8k ultra detailed|HDR|lens flare""".replace(
    "\n", " "
).split("|")

SYNONYMS = {
    "woman": ["lady", "female", "girl"],
    "man": ["guy", "gentleman", "male"],
    "person": ["individual", "someone"],
    "walking": ["strolling", "wandering", "ambling"],
    "running": ["jogging", "sprinting", "dashing"],
    "jumping": ["leaping", "hopping"],
    "sitting": ["seated", "resting"],
    "eating": ["munching", "feeding"],
    "talking": ["chatting", "speaking"],
    "flying": ["soaring", "gliding"],
    "dog": ["puppy", "hound"],
    "cat": ["kitten", "feline"],
    "car": ["vehicle", "automobile"],
    "big": ["large", "huge"],
    "small": ["little", "tiny"],
    "beautiful": ["lovely", "gorgeous", "stunning"],
    "city": ["urban", "town"],
    "street": ["road", "avenue"],
    "forest": ["woods", "woodland"],
    "ocean": ["sea"],
    "beach": ["shore", "seaside"],
    "mountain": ["hill", "peak"],
    "sunset": ["dusk", "evening"],
    "night": ["nighttime", "evening"],
    "fast": ["quickly", "rapidly"],
    "slowly": ["gently", "leisurely"],
    "red": ["crimson", "scarlet"],
    "blue": ["azure", "navy"],
    "green": ["emerald", "verdant"],
    "playing": ["having fun", "enjoying"],
    "shot": ["view", "footage"],
    "video": ["clip", "footage"],
    "moving": ["travelling", "going"],
    "old": ["elderly", "aged"],
    "young": ["little", "youthful"],
    "house": ["home", "cottage"],
    "river": ["stream", "creek"],
    "boat": ["vessel", "ship"],
    "field": ["meadow", "pasture"],
    "light": ["glow", "illumination"],
}
FRAMES = [
    "{}",
    "a video of {}",
    "footage of {}",
    "a clip showing {}",
    "{}, filmed on camera",
    "a short film: {}",
    "{} in high quality",
    "a scene where {}",
    "watch {}",
    "{}, realistic video",
]
SUBJECTS, ACTIONS, PLACES, TIMES, CAMERAS, STYLES = (
    [w.strip() for w in words if w.strip()]
    for words in (SUBJECTS, ACTIONS, PLACES, TIMES, CAMERAS, STYLES)
)
DROPPABLE = {"a", "an", "the", "very", "some", "beautiful", "small", "big", "young", "old"}


def benchmark_prompts() -> list[str]:
    """VBench's and PhyGenBench's prompts (distinct, in file order)."""
    info = json.loads((ROOT / "evaluation" / "vbench" / "VBench_full_info.json").read_text())
    phy = json.loads((ROOT / "evaluation" / "phygenbench" / "prompts.json").read_text())
    prompts = [e["prompt_en"] for e in info] + [e["caption"] for e in phy]
    return list(dict.fromkeys(p.strip() for p in prompts if p.strip()))


def _caption(rng: random.Random) -> str:
    subject, action, place = rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES)
    time, camera = rng.choice(TIMES), rng.choice(CAMERAS)
    style = rng.choice(STYLES) if rng.random() < 0.5 else None
    form = rng.randrange(4)
    if form == 0:
        text = f"{subject} {action} {place} {time}, {camera}"
    elif form == 1:
        text = f"{camera} of {subject} {action} {place} {time}"
    elif form == 2:
        text = f"{time.capitalize()}, {subject} is {action} {place}. {camera.capitalize()}"
    else:
        text = f"{subject.capitalize()} {action} {place}; the camera holds a {camera} {time}"
    if style:
        text += f", {style}"
    return text


def grammar_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions (deterministic in ``seed``)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[_caption(rng)] = None
    return list(out)


def paraphrase(text: str, rng: random.Random) -> str:
    """One rewording of ``text``: synonyms for some words, a dropped modifier, maybe a framing
    phrase or a swap of the clauses around the first comma, and a case change."""
    words = re.findall(r"\w+|[^\w\s]", text)
    out = []
    for w in words:
        low = w.lower()
        if low in SYNONYMS and rng.random() < 0.5:
            w = rng.choice(SYNONYMS[low])
        elif low in DROPPABLE and rng.random() < 0.3:
            continue
        out.append(w)
    sentence = re.sub(r"\s+([^\w\s])", r"\1", " ".join(out))
    if "," in sentence and rng.random() < 0.3:
        head, tail = sentence.split(",", 1)
        sentence = f"{tail.strip()}, {head.strip()}"
    sentence = rng.choice(FRAMES).format(sentence)
    return sentence.lower() if rng.random() < 0.5 else sentence
