"""The ``torch-crisp`` subcommands ``collect`` and ``inspect``, and what all subcommands share."""
