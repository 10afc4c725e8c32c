//! Writing an [`Export`]: CSV, JSON, Parquet. Each states the [`Metadata`].
//!
//! - CSV (RFC 4180, CRLF): one `# name: value` line per metadata field, then the header row,
//!   then the rows. Every field is a pseudonym, a validated id or group name, a time or a
//!   number: nothing needs quoting.
//! - JSON: one object `{"metadata": {...}, "rows": [...]}`.
//! - Parquet: one file, uncompressed, row groups of [`PARQUET_ROW_GROUP`] rows; `bucket_start`
//!   is `INT64 TIMESTAMP(MICROS, UTC)`, names are `STRING`, numbers `DOUBLE` and `INT64`; the
//!   metadata is the file's key-value metadata `gridward.export` (the JSON object).

use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;

use gridward_core::document::format_timestamp;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use time::OffsetDateTime;

use crate::error::ExportError;
use crate::export::{Export, Rows};

/// Rows per Parquet row group.
pub const PARQUET_ROW_GROUP: usize = 100_000;

/// The Parquet key-value metadata key holding the export's metadata (JSON).
pub const PARQUET_METADATA_KEY: &str = "gridward.export";

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutputFormat {
    /// CSV with `#` metadata lines.
    Csv,
    /// One JSON object.
    Json,
    /// Apache Parquet.
    Parquet,
}

impl OutputFormat {
    /// `csv`, `json`, `parquet`.
    pub fn code(self) -> &'static str {
        match self {
            OutputFormat::Csv => "csv",
            OutputFormat::Json => "json",
            OutputFormat::Parquet => "parquet",
        }
    }

    /// The media type.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Csv => "text/csv; charset=utf-8",
            OutputFormat::Json => "application/json",
            OutputFormat::Parquet => "application/vnd.apache.parquet",
        }
    }
}

impl FromStr for OutputFormat {
    type Err = ExportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "csv" => Ok(OutputFormat::Csv),
            "json" => Ok(OutputFormat::Json),
            "parquet" => Ok(OutputFormat::Parquet),
            other => Err(ExportError::BadFormat(other.to_owned())),
        }
    }
}

/// Writes `export` as `format` to `out` (buffer it: the writers make many small writes).
///
/// # Errors
///
/// [`ExportError::Io`], [`ExportError::Json`], [`ExportError::Parquet`].
pub fn write<W: Write + Send>(
    export: &Export,
    format: OutputFormat,
    out: W,
) -> Result<(), ExportError> {
    match format {
        OutputFormat::Csv => write_csv(export, out),
        OutputFormat::Json => write_json(export, out),
        OutputFormat::Parquet => write_parquet(export, out),
    }
}

/// Writes `export` as CSV.
///
/// # Errors
///
/// [`ExportError::Io`].
pub fn write_csv<W: Write>(export: &Export, mut out: W) -> Result<(), ExportError> {
    for (name, value) in export.metadata.fields() {
        write!(out, "# {name}: {value}\r\n")?;
    }
    write!(out, "{}\r\n", export.metadata.columns.join(","))?;
    match &export.rows {
        Rows::Meters(rows) => {
            for r in rows {
                write!(
                    out,
                    "{},{},{}",
                    r.meter,
                    format_timestamp(r.bucket_start),
                    r.kwh
                )?;
                if let Some(reg) = r.register_kwh {
                    write!(out, ",{reg}")?;
                }
                out.write_all(b"\r\n")?;
            }
        }
        Rows::Groups(rows) => {
            for r in rows {
                write!(
                    out,
                    "{},{},{},{}\r\n",
                    r.group,
                    format_timestamp(r.bucket_start),
                    r.meters,
                    r.kwh
                )?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Writes `export` as one JSON object and a newline.
///
/// # Errors
///
/// [`ExportError::Json`], [`ExportError::Io`].
pub fn write_json<W: Write>(export: &Export, mut out: W) -> Result<(), ExportError> {
    serde_json::to_writer(&mut out, export)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn micros(t: OffsetDateTime) -> i64 {
    // Buckets are whole seconds within `time`'s range: no overflow.
    t.unix_timestamp().saturating_mul(1_000_000)
}

/// Writes `export` as a Parquet file.
///
/// # Errors
///
/// [`ExportError::Parquet`], [`ExportError::Json`].
pub fn write_parquet<W: Write + Send>(export: &Export, out: W) -> Result<(), ExportError> {
    let pseudonymised = export.metadata.pseudonymised;
    let schema = match (&export.rows, pseudonymised) {
        (Rows::Meters(_), true) => {
            "message gridward_export {
                REQUIRED BYTE_ARRAY meter (STRING);
                REQUIRED INT64 bucket_start (TIMESTAMP(MICROS,true));
                REQUIRED DOUBLE kwh;
            }"
        }
        (Rows::Meters(_), false) => {
            "message gridward_export {
                REQUIRED BYTE_ARRAY meter (STRING);
                REQUIRED INT64 bucket_start (TIMESTAMP(MICROS,true));
                REQUIRED DOUBLE kwh;
                REQUIRED DOUBLE register_kwh;
            }"
        }
        (Rows::Groups(_), _) => {
            "message gridward_export {
                REQUIRED BYTE_ARRAY group (STRING);
                REQUIRED INT64 bucket_start (TIMESTAMP(MICROS,true));
                REQUIRED INT64 meters;
                REQUIRED DOUBLE kwh;
            }"
        }
    };
    let schema = Arc::new(parse_message_type(schema)?);
    let props = WriterProperties::builder()
        .set_created_by(format!("gridward {}", export.metadata.gridward_version))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            PARQUET_METADATA_KEY.to_owned(),
            serde_json::to_string(&export.metadata)?,
        )]))
        .build();
    let mut writer = SerializedFileWriter::new(out, schema, Arc::new(props))?;
    match &export.rows {
        Rows::Meters(rows) => {
            for chunk in rows.chunks(PARQUET_ROW_GROUP) {
                let mut rg = writer.next_row_group()?;
                let mut column = 0;
                while let Some(mut col) = rg.next_column()? {
                    match column {
                        0 => {
                            let v: Vec<ByteArray> = chunk
                                .iter()
                                .map(|r| ByteArray::from(r.meter.as_str()))
                                .collect();
                            col.typed::<ByteArrayType>().write_batch(&v, None, None)?;
                        }
                        1 => {
                            let v: Vec<i64> =
                                chunk.iter().map(|r| micros(r.bucket_start)).collect();
                            col.typed::<Int64Type>().write_batch(&v, None, None)?;
                        }
                        2 => {
                            let v: Vec<f64> = chunk.iter().map(|r| r.kwh).collect();
                            col.typed::<DoubleType>().write_batch(&v, None, None)?;
                        }
                        _ => {
                            let v: Vec<f64> = chunk
                                .iter()
                                .map(|r| r.register_kwh.unwrap_or(f64::NAN))
                                .collect();
                            col.typed::<DoubleType>().write_batch(&v, None, None)?;
                        }
                    }
                    col.close()?;
                    column += 1;
                }
                rg.close()?;
            }
        }
        Rows::Groups(rows) => {
            for chunk in rows.chunks(PARQUET_ROW_GROUP) {
                let mut rg = writer.next_row_group()?;
                let mut column = 0;
                while let Some(mut col) = rg.next_column()? {
                    match column {
                        0 => {
                            let v: Vec<ByteArray> = chunk
                                .iter()
                                .map(|r| ByteArray::from(r.group.as_str()))
                                .collect();
                            col.typed::<ByteArrayType>().write_batch(&v, None, None)?;
                        }
                        1 => {
                            let v: Vec<i64> =
                                chunk.iter().map(|r| micros(r.bucket_start)).collect();
                            col.typed::<Int64Type>().write_batch(&v, None, None)?;
                        }
                        2 => {
                            let v: Vec<i64> = chunk
                                .iter()
                                .map(|r| i64::try_from(r.meters).unwrap_or(i64::MAX))
                                .collect();
                            col.typed::<Int64Type>().write_batch(&v, None, None)?;
                        }
                        _ => {
                            let v: Vec<f64> = chunk.iter().map(|r| r.kwh).collect();
                            col.typed::<DoubleType>().write_batch(&v, None, None)?;
                        }
                    }
                    col.close()?;
                    column += 1;
                }
                rg.close()?;
            }
        }
    }
    writer.close()?;
    Ok(())
}
