// An independent implementation of the Gridward envelope (docs/wire-format.md), using only the
// JDK: its own minimal CBOR reader and writer, java.security for the signatures. Used by
// crates/gridward-core/tests/interop.rs; nothing here is shared with Gridward's Rust code.
//
// Modes:
//   verify <envelope-file> <topic> <spki-der-file>
//       Parses the COSE_Sign1, builds the Sig_structure with the topic as external AAD and
//       verifies it. Prints "OK alg=<n> kid=<hex>" and exits 0, or prints "FAIL <reason>" on
//       stderr and exits 1 (2 for usage or I/O errors).
//   spki <keystore.p12> <storepass> <alias> <spki-out>
//       Writes the DER SubjectPublicKeyInfo of the alias's certificate key.
//   sign <tbs-file> <keystore.p12> <storepass> <alias> <sig-out> <spki-out>
//       Signs the given bytes (a Sig_structure) with the alias's private key: SHA256withRSA,
//       SHA256withECDSA (converted from DER to the raw 64-byte r || s) or Ed25519; writes the
//       signature and the certificate key's SPKI.

import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.Signature;
import java.security.cert.Certificate;
import java.security.spec.X509EncodedKeySpec;
import java.util.Arrays;

public final class EnvelopeCheck {
    static final long ALG_ES256 = -7;
    static final long ALG_EDDSA = -8;
    static final long ALG_RS256 = -257;
    static final int KID_LEN = 16;
    static final int MAX_DEPTH = 16;

    /** A verification failure: the envelope is malformed or its signature does not verify. */
    static final class Refused extends Exception {
        Refused(String reason) {
            super(reason);
        }
    }

    /** A minimal reader for definite-length CBOR (RFC 8949). */
    static final class Cbor {
        final byte[] buf;
        int pos;
        int major;
        long arg;

        Cbor(byte[] buf) {
            this.buf = buf;
        }

        int peek() throws Refused {
            if (pos >= buf.length) {
                throw new Refused("truncated CBOR");
            }
            return buf[pos] & 0xff;
        }

        int u8() throws Refused {
            int b = peek();
            pos++;
            return b;
        }

        /** Reads an item head into {@link #major} and {@link #arg}. */
        void head() throws Refused {
            int ib = u8();
            major = ib >>> 5;
            int ai = ib & 0x1f;
            int extra;
            if (ai < 24) {
                arg = ai;
                return;
            } else if (ai == 24) {
                extra = 1;
            } else if (ai == 25) {
                extra = 2;
            } else if (ai == 26) {
                extra = 4;
            } else if (ai == 27) {
                extra = 8;
            } else {
                throw new Refused("indefinite length or reserved CBOR head 0x" + Integer.toHexString(ib));
            }
            long v = 0;
            for (int i = 0; i < extra; i++) {
                v = (v << 8) | u8();
            }
            if (v < 0) {
                throw new Refused("CBOR argument exceeds 2^63");
            }
            arg = v;
        }

        int length() throws Refused {
            if (arg > buf.length - pos) {
                throw new Refused("CBOR length " + arg + " exceeds the input");
            }
            return (int) arg;
        }

        byte[] bstr(String what) throws Refused {
            head();
            if (major != 2) {
                throw new Refused(what + " is not a byte string (major type " + major + ")");
            }
            int n = length();
            byte[] out = Arrays.copyOfRange(buf, pos, pos + n);
            pos += n;
            return out;
        }

        long integer(String what) throws Refused {
            head();
            if (major == 0) {
                return arg;
            } else if (major == 1) {
                return -1 - arg;
            }
            throw new Refused(what + " is not an integer (major type " + major + ")");
        }

        void skip(int depth) throws Refused {
            if (depth > MAX_DEPTH) {
                throw new Refused("CBOR nested too deeply");
            }
            head();
            switch (major) {
                case 0, 1, 7 -> { }
                case 2, 3 -> pos += length();
                case 4 -> {
                    for (long i = 0, n = arg; i < n; i++) {
                        skip(depth + 1);
                    }
                }
                case 5 -> {
                    for (long i = 0, n = arg; i < n; i++) {
                        skip(depth + 1);
                        skip(depth + 1);
                    }
                }
                case 6 -> skip(depth + 1);
                default -> throw new Refused("impossible CBOR major type");
            }
        }

        boolean atEnd() {
            return pos == buf.length;
        }
    }

    /** The COSE_Sign1 parts Gridward uses. */
    record Sign1(byte[] protectedBytes, long alg, byte[] kid, byte[] payload, byte[] signature) { }

    static Sign1 parse(byte[] envelope) throws Refused {
        Cbor c = new Cbor(envelope);
        int first = c.peek();
        if (first == 0xd2) {
            c.pos++; // tag 18, COSE_Sign1
        } else if (first >>> 5 == 6) {
            throw new Refused("wrong CBOR tag");
        }
        c.head();
        if (c.major != 4 || c.arg != 4) {
            throw new Refused("not an array of 4");
        }
        byte[] protectedBytes = c.bstr("protected header");
        c.head();
        if (c.major != 5) {
            throw new Refused("unprotected header is not a map");
        }
        if (c.arg != 0) {
            throw new Refused("unprotected header is not empty");
        }
        byte[] payload = c.bstr("payload");
        byte[] signature = c.bstr("signature");
        if (!c.atEnd()) {
            throw new Refused("trailing bytes after the COSE_Sign1");
        }

        Cbor h = new Cbor(protectedBytes);
        h.head();
        if (h.major != 5) {
            throw new Refused("protected header is not a map");
        }
        Long alg = null;
        byte[] kid = null;
        for (long i = 0, n = h.arg; i < n; i++) {
            int labelMajor = h.peek() >>> 5;
            if (labelMajor == 0 || labelMajor == 1) {
                long label = h.integer("label");
                if (label == 1) {
                    if (alg != null) {
                        throw new Refused("alg twice");
                    }
                    alg = h.integer("alg");
                } else if (label == 4) {
                    if (kid != null) {
                        throw new Refused("kid twice");
                    }
                    kid = h.bstr("kid");
                } else {
                    h.skip(0);
                }
            } else {
                h.skip(0);
                h.skip(0);
            }
        }
        if (!h.atEnd()) {
            throw new Refused("trailing bytes after the protected header map");
        }
        if (alg == null) {
            throw new Refused("protected header has no alg");
        }
        if (kid == null) {
            throw new Refused("protected header has no kid");
        }
        return new Sign1(protectedBytes, alg, kid, payload, signature);
    }

    static void writeHead(ByteArrayOutputStream out, int major, long value) {
        int mt = major << 5;
        if (value < 24) {
            out.write(mt | (int) value);
        } else if (value < 0x100) {
            out.write(mt | 24);
            out.write((int) value);
        } else if (value < 0x10000) {
            out.write(mt | 25);
            out.write((int) (value >>> 8));
            out.write((int) value);
        } else if (value < 0x100000000L) {
            out.write(mt | 26);
            for (int shift = 24; shift >= 0; shift -= 8) {
                out.write((int) (value >>> shift));
            }
        } else {
            out.write(mt | 27);
            for (int shift = 56; shift >= 0; shift -= 8) {
                out.write((int) (value >>> shift));
            }
        }
    }

    static void writeBstr(ByteArrayOutputStream out, byte[] bytes) {
        writeHead(out, 2, bytes.length);
        out.writeBytes(bytes);
    }

    /** Sig_structure = ["Signature1", protected, external_aad, payload] (RFC 9052 §4.4). */
    static byte[] sigStructure(byte[] protectedBytes, byte[] externalAad, byte[] payload) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        writeHead(out, 4, 4);
        byte[] context = "Signature1".getBytes(StandardCharsets.US_ASCII);
        writeHead(out, 3, context.length);
        out.writeBytes(context);
        writeBstr(out, protectedBytes);
        writeBstr(out, externalAad);
        writeBstr(out, payload);
        return out.toByteArray();
    }

    /** Raw r || s (64 bytes) to ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }. */
    static byte[] rawToDer(byte[] raw) throws Refused {
        if (raw.length != 64) {
            throw new Refused("ES256 signature is " + raw.length + " bytes, expected 64");
        }
        byte[] r = new BigInteger(1, Arrays.copyOfRange(raw, 0, 32)).toByteArray();
        byte[] s = new BigInteger(1, Arrays.copyOfRange(raw, 32, 64)).toByteArray();
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        out.write(0x30);
        out.write(2 + r.length + 2 + s.length); // at most 70: short form
        out.write(0x02);
        out.write(r.length);
        out.writeBytes(r);
        out.write(0x02);
        out.write(s.length);
        out.writeBytes(s);
        return out.toByteArray();
    }

    /** ECDSA-Sig-Value (DER) to raw r || s, each left-padded to 32 bytes. */
    static byte[] derToRaw(byte[] der) {
        int pos = 0;
        if (der[pos++] != 0x30) {
            throw new IllegalArgumentException("ECDSA signature is not a SEQUENCE");
        }
        int len = der[pos++] & 0xff;
        if (len == 0x81) {
            pos++;
        }
        byte[] raw = new byte[64];
        for (int half = 0; half < 2; half++) {
            if (der[pos++] != 0x02) {
                throw new IllegalArgumentException("ECDSA signature part is not an INTEGER");
            }
            int n = der[pos++] & 0xff;
            byte[] unsigned = new BigInteger(Arrays.copyOfRange(der, pos, pos + n)).toByteArray();
            pos += n;
            int skip = unsigned.length > 32 ? unsigned.length - 32 : 0;
            for (int i = 0; i < skip; i++) {
                if (unsigned[i] != 0) {
                    throw new IllegalArgumentException("ECDSA signature part longer than 32 bytes");
                }
            }
            int copy = unsigned.length - skip;
            System.arraycopy(unsigned, skip, raw, half * 32 + 32 - copy, copy);
        }
        return raw;
    }

    static byte[] keyId(byte[] spki) throws Exception {
        return Arrays.copyOf(MessageDigest.getInstance("SHA-256").digest(spki), KID_LEN);
    }

    static String hex(byte[] bytes) {
        StringBuilder sb = new StringBuilder();
        for (byte b : bytes) {
            sb.append(String.format("%02x", b & 0xff));
        }
        return sb.toString();
    }

    static void verify(byte[] envelope, String topic, byte[] spki) throws Exception {
        Sign1 m = parse(envelope);
        if (!Arrays.equals(m.kid(), keyId(spki))) {
            throw new Refused("kid " + hex(m.kid()) + " is not the key's " + hex(keyId(spki)));
        }
        String keyAlg;
        String sigAlg;
        byte[] sig;
        if (m.alg() == ALG_RS256) {
            keyAlg = "RSA";
            sigAlg = "SHA256withRSA";
            sig = m.signature();
        } else if (m.alg() == ALG_ES256) {
            keyAlg = "EC";
            sigAlg = "SHA256withECDSA";
            sig = rawToDer(m.signature());
        } else if (m.alg() == ALG_EDDSA) {
            keyAlg = "Ed25519";
            sigAlg = "Ed25519";
            sig = m.signature();
        } else {
            throw new Refused("unsupported alg " + m.alg());
        }
        PublicKey key;
        try {
            key = KeyFactory.getInstance(keyAlg).generatePublic(new X509EncodedKeySpec(spki));
        } catch (java.security.spec.InvalidKeySpecException e) {
            throw new Refused("alg " + m.alg() + " does not match the key: " + e.getMessage());
        }
        Signature verifier = Signature.getInstance(sigAlg);
        verifier.initVerify(key);
        verifier.update(sigStructure(m.protectedBytes(), topic.getBytes(StandardCharsets.UTF_8), m.payload()));
        boolean ok;
        try {
            ok = verifier.verify(sig);
        } catch (java.security.SignatureException e) {
            ok = false;
        }
        if (!ok) {
            throw new Refused("BAD SIGNATURE");
        }
        System.out.println("OK alg=" + m.alg() + " kid=" + hex(m.kid()));
    }

    static KeyStore loadKeyStore(String path, char[] storepass) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(path)) {
            ks.load(in, storepass);
        }
        return ks;
    }

    static byte[] certificateSpki(KeyStore ks, String alias) throws Exception {
        Certificate cert = ks.getCertificate(alias);
        if (cert == null) {
            throw new IllegalArgumentException("no certificate under alias " + alias);
        }
        return cert.getPublicKey().getEncoded();
    }

    static void sign(byte[] tbs, String keystore, char[] storepass, String alias, Path sigOut, Path spkiOut)
            throws Exception {
        KeyStore ks = loadKeyStore(keystore, storepass);
        PrivateKey key = (PrivateKey) ks.getKey(alias, storepass);
        if (key == null) {
            throw new IllegalArgumentException("no private key under alias " + alias);
        }
        byte[] sig;
        switch (key.getAlgorithm()) {
            case "RSA" -> {
                Signature s = Signature.getInstance("SHA256withRSA");
                s.initSign(key);
                s.update(tbs);
                sig = s.sign();
            }
            case "EC" -> {
                Signature s = Signature.getInstance("SHA256withECDSA");
                s.initSign(key);
                s.update(tbs);
                sig = derToRaw(s.sign());
            }
            case "Ed25519", "EdDSA" -> {
                Signature s = Signature.getInstance("Ed25519");
                s.initSign(key);
                s.update(tbs);
                sig = s.sign();
            }
            default -> throw new IllegalArgumentException("unsupported key algorithm " + key.getAlgorithm());
        }
        Files.write(sigOut, sig);
        Files.write(spkiOut, certificateSpki(ks, alias));
    }

    static void usage() {
        System.err.println("usage: EnvelopeCheck verify <envelope-file> <topic> <spki-der-file>");
        System.err.println("       EnvelopeCheck spki <keystore.p12> <storepass> <alias> <spki-out>");
        System.err.println("       EnvelopeCheck sign <tbs-file> <keystore.p12> <storepass> <alias> <sig-out> <spki-out>");
        System.exit(2);
    }

    public static void main(String[] args) {
        if (args.length == 0) {
            usage();
        }
        try {
            switch (args[0]) {
                case "verify" -> {
                    if (args.length != 4) {
                        usage();
                    }
                    verify(Files.readAllBytes(Path.of(args[1])), args[2], Files.readAllBytes(Path.of(args[3])));
                }
                case "spki" -> {
                    if (args.length != 5) {
                        usage();
                    }
                    KeyStore ks = loadKeyStore(args[1], args[2].toCharArray());
                    Files.write(Path.of(args[4]), certificateSpki(ks, args[3]));
                }
                case "sign" -> {
                    if (args.length != 7) {
                        usage();
                    }
                    sign(Files.readAllBytes(Path.of(args[1])), args[2], args[3].toCharArray(), args[4],
                            Path.of(args[5]), Path.of(args[6]));
                }
                default -> usage();
            }
        } catch (Refused e) {
            System.err.println("FAIL " + e.getMessage());
            System.exit(1);
        } catch (Exception e) {
            System.err.println("ERROR " + e);
            System.exit(2);
        }
    }
}
