"""The command-line entry points installed as console scripts: ``gptjax-train``
(``gptjax.cli.train``) and ``gptjax-compress`` (``gptjax.cli.compress``)."""
