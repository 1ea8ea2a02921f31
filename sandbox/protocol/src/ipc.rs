//! Reading an Arrow IPC stream that sits whole in one buffer without copying
//! it: the batches' arrays point into the buffer, which they keep alive.
//!
//! Arrow's `StreamReader` reads from `std::io::Read`, so it copies every
//! message body out of the buffer the host filled, and its `StreamDecoder`
//! slices instead but cannot skip validation of record batches. A guest reads
//! every byte of every table it scans through here, so it frames the messages
//! itself and hands each to Arrow's `FileDecoder`, which slices and can skip.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::convert::fb_to_schema;
use arrow_ipc::reader::FileDecoder;
use arrow_ipc::{Block, MessageHeader, root_as_message};

const CONTINUATION: u32 = 0xFFFF_FFFF;

/// `batches` as one Arrow IPC stream, as a released result travels (empty
/// when there are none).
///
/// # Errors
/// Arrow's, as text.
pub fn write_stream(batches: &[RecordBatch]) -> Result<Vec<u8>, String> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &first.schema())
        .map_err(|e| e.to_string())?;
    for batch in batches {
        writer.write(batch).map_err(|e| e.to_string())?;
    }
    writer.into_inner().map_err(|e| e.to_string())
}

/// The batches of the IPC stream in `stream`, in order, every array checked
/// (offsets, UTF-8) as it is read. The first error ends the list: batches
/// before it are returned, nothing after it.
pub fn read_stream(stream: Buffer) -> Vec<Result<RecordBatch, String>> {
    collect(&stream, false)
}

/// [`read_stream`] that checks only the framing and the message headers, not
/// the arrays.
///
/// # Safety
/// `stream` must be what Arrow's IPC writer made from valid batches: an
/// invalid array read this way is undefined behaviour for whoever reads it.
#[allow(unsafe_code)]
pub unsafe fn read_trusted_stream(stream: Buffer) -> Vec<Result<RecordBatch, String>> {
    collect(&stream, true)
}

fn collect(stream: &Buffer, skip_validation: bool) -> Vec<Result<RecordBatch, String>> {
    let mut batches = Vec::new();
    if let Err(e) = read_into(stream, skip_validation, &mut batches) {
        batches.push(Err(e));
    }
    batches
}

fn read_into(
    stream: &Buffer,
    skip_validation: bool,
    batches: &mut Vec<Result<RecordBatch, String>>,
) -> Result<(), String> {
    let mut decoder: Option<FileDecoder> = None;
    let mut offset = 0;
    while offset < stream.len() {
        let word = |at: usize| -> Result<u32, String> {
            stream
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("IPC stream truncated at byte {at}"))
        };
        // Current streams prefix each message with a continuation marker;
        // streams from before Arrow 0.15 start with the length.
        let (prefix, metadata_len) = match word(offset)? {
            CONTINUATION => (8, word(offset + 4)?),
            len => (4, len),
        };
        if metadata_len == 0 {
            return Ok(()); // end of stream
        }
        let metadata_start = offset + prefix;
        let metadata_end = metadata_start
            .checked_add(metadata_len as usize)
            .filter(|&end| end <= stream.len())
            .ok_or_else(|| format!("IPC message at byte {offset} runs past the stream"))?;
        let metadata = &stream[metadata_start..metadata_end];
        let message = root_as_message(metadata)
            .map_err(|e| format!("IPC message at byte {offset} is malformed: {e}"))?;
        let body_len = usize::try_from(message.bodyLength())
            .map_err(|_| format!("IPC message at byte {offset} has a negative body length"))?;
        let end = metadata_end
            .checked_add(body_len)
            .filter(|&end| end <= stream.len())
            .ok_or_else(|| format!("IPC message body at byte {offset} runs past the stream"))?;
        let header_len = i32::try_from(prefix + metadata_len as usize)
            .map_err(|_| format!("IPC message at byte {offset} has an oversized header"))?;
        let block = Block::new(offset as i64, header_len, body_len as i64);
        let bytes = stream.slice_with_length(offset, end - offset);
        match message.header_type() {
            MessageHeader::Schema => {
                if decoder.is_some() {
                    return Err(format!(
                        "a second schema in the IPC stream at byte {offset}"
                    ));
                }
                let schema = message
                    .header_as_schema()
                    .ok_or_else(|| format!("IPC schema at byte {offset} is malformed"))?;
                let fresh = FileDecoder::new(Arc::new(fb_to_schema(schema)), message.version());
                let fresh = match skip_validation {
                    // SAFETY: only `read_trusted_stream` skips, whose caller
                    // vouches for the arrays.
                    #[allow(unsafe_code)]
                    true => unsafe { fresh.with_skip_validation(true) },
                    false => fresh,
                };
                decoder = Some(fresh);
            }
            header @ (MessageHeader::RecordBatch | MessageHeader::DictionaryBatch) => {
                let decoder = decoder
                    .as_mut()
                    .ok_or_else(|| format!("IPC data before the schema at byte {offset}"))?;
                if header == MessageHeader::DictionaryBatch {
                    decoder
                        .read_dictionary(&block, &bytes)
                        .map_err(|e| e.to_string())?;
                } else if let Some(batch) = decoder
                    .read_record_batch(&block, &bytes)
                    .map_err(|e| e.to_string())?
                {
                    batches.push(Ok(batch));
                }
            }
            other => {
                return Err(format!("unexpected IPC message {other:?} at byte {offset}"));
            }
        }
        offset = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Decimal128Array, Int64Array, RecordBatch, StringArray};
    use arrow_buffer::Buffer;
    use arrow_ipc::writer::StreamWriter;

    use super::{read_stream, read_trusted_stream};

    fn batch(rows: i64) -> RecordBatch {
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows));
        let names: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("row {i}")),
        ));
        let prices: ArrayRef = Arc::new(
            Decimal128Array::from_iter_values((0..rows).map(i128::from))
                .with_precision_and_scale(15, 2)
                .unwrap(),
        );
        RecordBatch::try_from_iter([("id", ids), ("name", names), ("price", prices)]).unwrap()
    }

    fn stream_of(batches: &[RecordBatch]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer = StreamWriter::try_new(&mut bytes, &batches[0].schema()).unwrap();
        for batch in batches {
            writer.write(batch).unwrap();
        }
        writer.finish().unwrap();
        drop(writer);
        bytes
    }

    fn ok(results: Vec<Result<RecordBatch, String>>) -> Vec<RecordBatch> {
        results.into_iter().map(|r| r.unwrap()).collect()
    }

    #[test]
    fn reads_every_batch_in_order_without_copying_the_arrays() {
        let written = [batch(3), batch(0), batch(1000)];
        let stream = Buffer::from_vec(stream_of(&written));
        let range = stream.as_ptr() as usize..stream.as_ptr() as usize + stream.len();
        let read = ok(read_stream(stream.clone()));
        assert_eq!(read, written);
        // Every column's values are a slice of the stream, not a copy of it.
        for batch in &read {
            for column in batch.columns() {
                let data = column.to_data();
                let values = data.buffers().last().unwrap();
                assert!(
                    range.contains(&(values.as_ptr() as usize)),
                    "{column:?} was copied"
                );
            }
        }
        // SAFETY: the stream is Arrow's writer's output from valid batches.
        #[allow(unsafe_code)]
        let trusted = ok(unsafe { read_trusted_stream(stream) });
        assert_eq!(trusted, written);
    }

    #[test]
    fn a_stream_cut_short_returns_what_came_before_and_then_the_error() {
        let bytes = stream_of(&[batch(3), batch(5)]);
        let whole = Buffer::from_vec(bytes.clone());
        let first_end = {
            // The cut falls inside the second batch's body.
            let one = stream_of(&[batch(3)]);
            one.len() - 8 + 40
        };
        let cut = Buffer::from_vec(bytes[..first_end].to_vec());
        let results = read_stream(cut);
        assert_eq!(results.len(), 2, "{results:?}");
        assert_eq!(results[0].as_ref().unwrap(), &batch(3));
        let error = results[1].as_ref().unwrap_err();
        assert!(error.contains("runs past the stream"), "{error}");
        assert_eq!(ok(read_stream(whole)).len(), 2);
    }

    #[test]
    fn malformed_framing_is_an_error_never_a_panic() {
        let bytes = stream_of(&[batch(2)]);
        // A schema message claims a header longer than the stream.
        let mut too_long = bytes.clone();
        too_long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let results = read_stream(Buffer::from_vec(too_long));
        assert!(
            results[0]
                .as_ref()
                .unwrap_err()
                .contains("runs past the stream")
        );
        // Garbage where the header's flatbuffer should be.
        let mut garbage = bytes.clone();
        for byte in &mut garbage[8..40] {
            *byte = 0xA5;
        }
        let results = read_stream(Buffer::from_vec(garbage));
        assert!(
            results[0].as_ref().unwrap_err().contains("malformed"),
            "{results:?}"
        );
        // Three bytes cannot even hold a length.
        let results = read_stream(Buffer::from_vec(vec![0xFFu8; 3]));
        assert!(
            results[0].as_ref().unwrap_err().contains("truncated"),
            "{results:?}"
        );
        // A batch with no schema before it.
        let schema_len = {
            let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            8 + len // the schema message has no body
        };
        let results = read_stream(Buffer::from_vec(bytes[schema_len..].to_vec()));
        assert!(
            results[0]
                .as_ref()
                .unwrap_err()
                .contains("before the schema"),
            "{results:?}"
        );
        // An empty buffer is an empty stream.
        assert!(read_stream(Buffer::from_vec(Vec::<u8>::new())).is_empty());
    }

    #[test]
    fn only_the_trusted_reader_skips_checking_the_arrays() {
        // A string column whose bytes are not UTF-8.
        let mut bytes = stream_of(&[batch(1)]);
        let at = bytes
            .windows(5)
            .position(|w| w == b"row 0")
            .expect("the string's bytes are in the stream");
        bytes[at] = 0xFF;
        let results = read_stream(Buffer::from_vec(bytes.clone()));
        let error = results[0].as_ref().unwrap_err();
        assert!(error.to_lowercase().contains("utf"), "{error}");
        // SAFETY: deliberately invalid, and never read as a string here:
        // this shows only that the check is skipped.
        #[allow(unsafe_code)]
        let skipped = unsafe { read_trusted_stream(Buffer::from_vec(bytes)) };
        assert_eq!(skipped[0].as_ref().unwrap().num_rows(), 1);
    }
}
