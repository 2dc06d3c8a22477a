"""The small core every layer uses: errors, files, compatibility layers, privacy, models, choices, Olive runs."""
