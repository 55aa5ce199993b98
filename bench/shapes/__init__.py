"""The embedded world, in one home: the captioned-shapes renderer and grammar (``world``), its
tokenizer (``text``), its teacher behind the ``Backbone`` interface (``teacher``) and that teacher's
trainer (``train_teacher``), its frozen evaluators behind the ``Evaluators`` interface
(``evaluators``) and their trainers (``train_evaluators``), and the builder of its shipped prompt
sets (``prompt_sets``). Shipped weights and their cards live in ``assets/``.

Methods never import this package: they see the teacher only through ``methods.backbone.Backbone``.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TEACHER_WEIGHTS = ASSETS / "teacher.safetensors"
TEACHER_CARD = ASSETS / "teacher.json"
# the two shipped teachers of one world: "vp" (ε-prediction, SD's schedule) and "flow" (rectified flow)
TEACHER_KINDS = ("vp", "flow")
TEACHER_FILES = {"vp": ("teacher.safetensors", "teacher.json"), "flow": ("teacher-flow.safetensors", "teacher-flow.json")}
# the method settings each teacher gives the entries of a suite that leave them unset ({method or "*": {setting: value}}):
# the methods' own defaults are the vp teacher's studied choices (study-teacher-guidance: w = 1.5); the flow teacher's
# guidance study chose w = 1 (study-teacher-guidance-flow), which its teacher runs unguided (1 NFE per step), and the
# w-embedding methods' training range starts there
TEACHER_CONVENTIONS = {"vp": {}, "flow": {"*": {"guidance_scale": 1.0}, "teacher": {"guidance": "none"},
                                          "lcm": {"w_min": 1.0}, "progressive": {"w_min": 1.0}}}
ATTRIBUTE_NET_CARD = ASSETS / "attribute_net.json"
CLIP_CARD = ASSETS / "clip.json"
