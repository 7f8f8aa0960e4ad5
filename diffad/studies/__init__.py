"""The book's studies: what the chapters measure and show, on top of the method's core.

The core (``diffad.data``, ``metrics``, ``diffusion``, ``models``, ``backbones``, ``step``,
``train``, ``device_plan``, ``scoring``, ``denoise``, ``baselines``, ``methods``, ``evaluate``,
``overlays``, ``detector``) is the method and its evaluation: what a user of the library runs.
The studies use it and are never used by it (``tests/test_structure.py`` checks):

* :mod:`~diffad.studies.book`: a chapter's context (``setup``: preset, data, cache), its cached
  models and scores, the choices a chapter takes from its data;
* :mod:`~diffad.studies.analysis`: probes of a trained denoiser (noise sweeps, timestep
  profiles, what a mask rule changes);
* :mod:`~diffad.studies.feature_analysis`: probes of a backbone's features;
* :mod:`~diffad.studies.ablations`: the paper's ablations and the authors' code, setting by setting;
* :mod:`~diffad.studies.tuning`: choosing the scoring settings on the development set;
* :mod:`~diffad.studies.scoring_study`: the KL map, the feature map and the alpha sweep under the
  paper's scoring and the preset's (chapter 7b; chapters 11 and 14 read its cache);
* :mod:`~diffad.studies.scorecard`: the verdicts of chapter 14;
* :mod:`~diffad.studies.viz`, :mod:`~diffad.studies.widgets`: the chapters' figures and widgets.

A new chapter's helper goes here, in the module of the study it serves (or a new one).
"""
