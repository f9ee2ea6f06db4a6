"""Input data: shards (listing, tar reading with exact accounting, sample parsing), the embedded
format (`embedded`), the embed job's stages (`embed`), rows -> training batches (`batching`), and
the synthetic shapes set (`shapes`)."""
