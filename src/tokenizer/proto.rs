//! Just enough of the protobuf wire format to read a SentencePiece `ModelProto`: fields are
//! walked one at a time, unknown ones skipped, and every length checked against the bytes left,
//! so a truncated or foreign file is an error naming the byte offset, never a panic.

/// One field's value, as the wire type says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// Wire type 0: ints, bools, enums.
    Varint(u64),
    /// Wire type 1.
    Fixed64(u64),
    /// Wire type 2: strings, bytes, nested messages.
    Bytes(&'a [u8]),
    /// Wire type 5: floats.
    Fixed32(u32),
}

/// Walks the fields of one message.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the whole file, so errors in nested messages name file offsets.
    base: usize,
}

impl<'a> Reader<'a> {
    /// A reader over a whole file.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0, base: 0 }
    }

    /// A reader over a nested message found at `offset` of the file.
    pub fn nested(buf: &'a [u8], offset: usize) -> Self {
        Reader { buf, pos: 0, base: offset }
    }

    /// File offset of the next field.
    pub fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn varint(&mut self) -> Result<u64, String> {
        let start = self.offset();
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("a varint at byte {start} runs past the end of the data (truncated file?)"));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("the varint at byte {start} is longer than 10 bytes"))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let start = self.offset();
        let left = self.buf.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(format!("{what} at byte {start} needs {n} bytes, but only {left} are left (truncated file?)")),
        }
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    /// The next field's number, value and the file offset of its value; `None` at the end.
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>, usize)>, String> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let at = self.offset();
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(format!("field number {number} at byte {at} is not a valid protobuf field"));
        }
        let value_at = self.offset();
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.fixed("a 64-bit field")?)),
            2 => {
                let n = self.varint()?;
                let value_at = self.offset();
                return Ok(Some((number as u32, Value::Bytes(self.take(n, "a length-delimited field")?), value_at)));
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.fixed("a 32-bit field")?)),
            w => return Err(format!("wire type {w} of field {number} at byte {at} is not one a SentencePiece model uses")),
        };
        Ok(Some((number as u32, value, value_at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_wire_type_and_refuses_truncation() {
        // field 1 varint 300, field 2 bytes "hi", field 3 fixed32 1.5f, field 4 fixed64 7
        let mut buf = vec![0x08, 0xac, 0x02, 0x12, 2, b'h', b'i', 0x1d];
        buf.extend(1.5f32.to_le_bytes());
        buf.push(0x21);
        buf.extend(7u64.to_le_bytes());
        let mut r = Reader::new(&buf);
        assert_eq!(r.next_field().unwrap(), Some((1, Value::Varint(300), 1)));
        assert_eq!(r.next_field().unwrap(), Some((2, Value::Bytes(b"hi"), 5)));
        assert_eq!(r.next_field().unwrap(), Some((3, Value::Fixed32(1.5f32.to_bits()), 8)));
        assert_eq!(r.next_field().unwrap(), Some((4, Value::Fixed64(7), 13)));
        assert_eq!(r.next_field().unwrap(), None);
        let e = Reader::new(&buf[3..6]).next_field().unwrap_err();
        assert!(e.contains("needs 2 bytes, but only 1 are left"), "{e}");
        let e = Reader::new(&[0x08, 0x80]).next_field().unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        let e = Reader::new(b"{\"a\": 1}").next_field().unwrap_err();
        assert!(e.contains("wire type 3"), "{e}");
    }
}
